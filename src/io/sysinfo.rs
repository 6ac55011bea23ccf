//! Facts about the host the node runs on, read from `/proc`.

use std::path::{Path, PathBuf};

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

/// Forwarding this process turned on; dropping it writes back what was there
/// before (`0`), for every family it changed. A SIGKILLed node leaves it on: the
/// host's setting is then the admin's to restore.
#[must_use = "forwarding is turned off again when this is dropped"]
#[derive(Debug, Default)]
pub struct Forwarding {
    restore: Vec<(PathBuf, String)>,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for (path, before) in self.restore.drain(..) {
            match std::fs::write(&path, &before) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), value = %before, "forwarding restored")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot restore forwarding")
                }
            }
        }
    }
}

/// Turns on forwarding for the given families, reading `/proc` first so nothing is
/// written when it is already on (containers often mount it read-only).
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<Forwarding, ForwardingError> {
    enable_forwarding_at(Path::new("/proc/sys"), v4, v6)
}

/// A subnet router's forwarding, family by family: on while a prefix of that family
/// is in effect (approved), put back as it was when none is and on drop.
#[derive(Debug)]
pub struct ForwardingSwitch {
    sys: PathBuf,
    v4: Option<Forwarding>,
    v6: Option<Forwarding>,
}

impl ForwardingSwitch {
    pub fn new() -> Self {
        Self::at(Path::new("/proc/sys"))
    }

    /// Under another `/proc/sys` (tests).
    pub fn at(sys: &Path) -> Self {
        Self {
            sys: sys.to_path_buf(),
            v4: None,
            v6: None,
        }
    }

    /// Forwarding wanted for IPv4 and IPv6 now.
    pub fn set(&mut self, v4: bool, v6: bool) -> Result<(), ForwardingError> {
        for (want, on, family_v4) in [(v4, &mut self.v4, true), (v6, &mut self.v6, false)] {
            match (want, on.is_some()) {
                (true, false) => {
                    *on = Some(enable_forwarding_at(&self.sys, family_v4, !family_v4)?);
                }
                // Dropping the guard puts back what was there.
                (false, true) => *on = None,
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether forwarding can be turned on here for these families (already on, or
    /// the file is writable): checked before registering.
    pub fn check(&self, v4: bool, v6: bool) -> Result<(), ForwardingError> {
        for (family, path, sysctl) in FAMILIES {
            let want = if family == "IPv4" { v4 } else { v6 };
            let full = self.sys.join(path);
            if !want || read_at(&full).as_deref() == Some("1") {
                continue;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .map_err(|source| ForwardingError {
                    family,
                    path: full.display().to_string(),
                    sysctl,
                    source,
                })?;
        }
        Ok(())
    }
}

impl Default for ForwardingSwitch {
    fn default() -> Self {
        Self::new()
    }
}

const FAMILIES: [(&str, &str, &str); 2] = [
    ("IPv4", "net/ipv4/ip_forward", "net.ipv4.ip_forward"),
    (
        "IPv6",
        "net/ipv6/conf/all/forwarding",
        "net.ipv6.conf.all.forwarding",
    ),
];

fn read_at(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// [`enable_forwarding`] under another `/proc/sys` (tests).
pub fn enable_forwarding_at(sys: &Path, v4: bool, v6: bool) -> Result<Forwarding, ForwardingError> {
    let wanted = [
        (v4, "IPv4", "net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            v6,
            "IPv6",
            "net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ];
    let mut guard = Forwarding::default();
    for (on, family, path, sysctl) in wanted {
        let full = sys.join(path);
        let before = std::fs::read_to_string(&full)
            .ok()
            .map(|s| s.trim().to_string());
        if !on || before.as_deref() == Some("1") {
            continue;
        }
        std::fs::write(&full, "1").map_err(|source| ForwardingError {
            family,
            path: full.display().to_string(),
            sysctl,
            source,
        })?;
        tracing::info!(family, "enabled forwarding for the advertised prefixes");
        guard
            .restore
            .push((full, before.unwrap_or_else(|| "0".into())));
    }
    Ok(guard)
}

/// The host's addresses with their prefix lengths (each names its connected
/// prefix), on every interface but `except` (the mesh interface) and loopback: what
/// the node's route guard protects. Empty if the kernel will not say.
pub fn underlay_prefixes(except: &str) -> Vec<ipnet::IpNet> {
    let mut out = underlay_nets(except);
    out.sort();
    out.dedup();
    out
}

/// The host's underlay addresses a peer could reach us at (DESIGN §9), in the
/// kernel's order: every interface's but `except`'s and loopback's, without
/// link-local, multicast or unspecified ones. IPv6 ones are global or unique-local.
pub fn underlay_addrs(except: &str) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = Vec::new();
    for ip in underlay_nets(except).into_iter().map(|n| n.addr()) {
        if usable_underlay(ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Whether `ip` can be an underlay endpoint: not loopback, link-local, multicast,
/// unspecified, nor a v4-mapped IPv6 address.
pub fn usable_underlay(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => {
            !(a.is_loopback() || a.is_link_local() || a.is_multicast() || a.is_unspecified())
        }
        std::net::IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unicast_link_local()
                || a.is_multicast()
                || a.is_unspecified()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

fn underlay_nets(except: &str) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot list the host's addresses; the route guard protects only the coordinators");
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated interface name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == except.as_bytes() || ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: the address and netmask are sockaddrs of the family in sa_family.
        let net = unsafe { sockaddr_net(ifa.ifa_addr, ifa.ifa_netmask) };
        out.extend(net);
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// An address and its netmask as a prefix (None for other families).
///
/// # Safety
/// `addr` must point to a valid sockaddr; `mask`, if not null, to one of the same
/// family.
unsafe fn sockaddr_net(
    addr: *const libc::sockaddr,
    mask: *const libc::sockaddr,
) -> Option<ipnet::IpNet> {
    // SAFETY: the caller's contract; each cast matches the family read first.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let a = &*addr.cast::<libc::sockaddr_in>();
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                let len = if mask.is_null() {
                    32
                } else {
                    let m = &*mask.cast::<libc::sockaddr_in>();
                    u32::from_be(m.sin_addr.s_addr).leading_ones() as u8
                };
                ipnet::Ipv4Net::new(ip, len).ok().map(ipnet::IpNet::V4)
            }
            libc::AF_INET6 => {
                let a = &*addr.cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let len = if mask.is_null() {
                    128
                } else {
                    let m = &*mask.cast::<libc::sockaddr_in6>();
                    u128::from_be_bytes(m.sin6_addr.s6_addr).leading_ones() as u8
                };
                ipnet::Ipv6Net::new(ip, len).ok().map(ipnet::IpNet::V6)
            }
            _ => None,
        }
    }
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
    fn underlay_endpoints_skip_link_local_and_loopback() {
        for bad in [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:1.2.3.4",
        ] {
            assert!(!usable_underlay(bad.parse().unwrap()), "{bad}");
        }
        for good in ["203.0.113.5", "2001:db8::5", "fd00::5"] {
            assert!(usable_underlay(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn lists_underlay_prefixes_but_not_loopback() {
        let nets = underlay_prefixes("nx-none");
        assert!(nets.iter().all(|n| !n.addr().is_loopback()), "{nets:?}");
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

#[cfg(test)]
mod forwarding_tests {
    use super::*;

    #[test]
    fn forwarding_comes_back_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let v4 = dir.path().join("net/ipv4/ip_forward");
        let v6 = dir.path().join("net/ipv6/conf/all/forwarding");
        std::fs::create_dir_all(v4.parent().unwrap()).unwrap();
        std::fs::create_dir_all(v6.parent().unwrap()).unwrap();
        std::fs::write(&v4, "0\n").unwrap();
        std::fs::write(&v6, "1\n").unwrap();
        let g = enable_forwarding_at(dir.path(), true, true).unwrap();
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "1");
        drop(g);
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "0");
        // The switch: on while wanted, back when not, and on drop.
        let mut sw = ForwardingSwitch::at(dir.path());
        sw.check(true, true).unwrap();
        sw.set(false, false).unwrap();
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "0");
        sw.set(true, false).unwrap();
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "1");
        sw.set(false, false).unwrap();
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "0");
        sw.set(true, true).unwrap();
        drop(sw);
        assert_eq!(std::fs::read_to_string(&v4).unwrap(), "0");
        // Already on: left alone, on and after.
        assert_eq!(std::fs::read_to_string(&v6).unwrap(), "1\n");
    }
}
