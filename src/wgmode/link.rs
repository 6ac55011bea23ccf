//! Where the interface is now, seen from its TUN file descriptor: whether it still
//! exists and its MTU, in whatever network namespace it lives (`ip link set IFNAME
//! netns NS` moves it after creation; the process, its UDP socket and its UAPI
//! socket stay where they were made, as with wireguard-go).
//!
//! Names and interface indices mean nothing outside their namespace, so nothing
//! here looks the interface up in the process's namespace: `TUNGETIFF` on our own
//! descriptor gives its current name, `TUNGETDEVNETNS` its current namespace, and a
//! socket made in that namespace answers `SIOCGIFMTU` for that name. A deleted
//! interface leaves the descriptor detached: both ioctls then fail with `EBADFD`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What a look at the interface found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// It exists, with this MTU (`None`: could not be read this time).
    Up(Option<usize>),
    /// It was deleted.
    Gone,
}

/// Watches the interface behind one TUN descriptor.
pub struct Link {
    tun: OwnedFd,
    /// The namespace the socket below was made in (device and inode of its nsfs
    /// file), and a socket made there.
    netns: Option<((u64, u64), OwnedFd)>,
}

impl Link {
    /// Watches the interface of `tun` (a duplicate of the data path's descriptor).
    pub fn new(tun: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own, or -1.
        let fd = unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: fd is valid and owned by nobody else.
            tun: unsafe { OwnedFd::from_raw_fd(fd) },
            netns: None,
        })
    }

    /// Looks at the interface now.
    pub fn check(&mut self) -> LinkState {
        let Some(name) = self.name() else {
            return LinkState::Gone;
        };
        let ns = match self.namespace() {
            Ok(ns) => ns,
            Err(e) if gone(&e) => return LinkState::Gone,
            Err(e) => {
                tracing::debug!(error = %e, "cannot find the interface's namespace");
                return LinkState::Up(None);
            }
        };
        let id = match file_id(&ns) {
            Ok(id) => id,
            Err(_) => return LinkState::Up(None),
        };
        if self.netns.as_ref().is_none_or(|(have, _)| *have != id) {
            match socket_in(ns) {
                Ok(sock) => {
                    tracing::debug!(?id, "interface namespace (re)discovered");
                    self.netns = Some((id, sock));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open a socket in the interface's namespace");
                    return LinkState::Up(None);
                }
            }
        }
        let Some((_, sock)) = self.netns.as_ref() else {
            return LinkState::Up(None);
        };
        LinkState::Up(mtu(sock, &name))
    }

    /// The interface's current name; `None` once it is deleted.
    fn name(&self) -> Option<[libc::c_char; libc::IFNAMSIZ]> {
        // SAFETY: a zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes the name and flags into a live ifreq.
        let r = unsafe { libc::ioctl(self.tun.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        (r == 0).then_some(req.ifr_name)
    }

    /// A descriptor of the interface's current network namespace.
    fn namespace(&self) -> std::io::Result<OwnedFd> {
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(self.tun.as_raw_fd(), libc::TUNGETDEVNETNS) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::ENODEV | libc::ENXIO)
    )
}

/// (device, inode): the identity of a namespace file.
fn file_id(fd: &OwnedFd) -> std::io::Result<(u64, u64)> {
    // SAFETY: a zeroed stat is valid; fstat fills it from a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// A datagram socket made in namespace `ns` (on a short-lived thread that enters it:
/// entering changes only that thread's namespace; the socket stays in it for life).
fn socket_in(ns: OwnedFd) -> std::io::Result<OwnedFd> {
    std::thread::Builder::new()
        .name("nexodus-netns".into())
        .spawn(move || {
            // SAFETY: setns on a valid namespace fd changes this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: plain syscall; a non-negative return is a new fd we own.
            let fd =
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is valid and owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// `SIOCGIFMTU` for `name` in the namespace of `sock`.
fn mtu(sock: &OwnedFd, name: &[libc::c_char; libc::IFNAMSIZ]) -> Option<usize> {
    // SAFETY: a zeroed ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = *name;
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into a live ifreq.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    if r != 0 {
        return None;
    }
    // SAFETY: SIOCGIFMTU set the union's mtu member.
    usize::try_from(unsafe { req.ifr_ifru.ifru_mtu }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_no_tun_reads_as_gone() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut link = Link::new(&a).unwrap();
        assert_eq!(link.check(), LinkState::Gone);
    }
}
