//! The node's TUN interface (tun-rs): created with its v4 address as /32 and its v6
//! address as /64 (which gives the kernel route for the organization's v6 prefix).
//! Closing the device removes the interface and every route through it.

use std::net::{Ipv4Addr, Ipv6Addr};

pub use tun_rs::SyncDevice;

/// Default interface MTU: 1500 minus IPv4 (20), UDP (8), WireGuard (32) overheads,
/// with room for an IPv6 outer header.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(
        "cannot create TUN interface {name}: {source} (needs root or CAP_NET_ADMIN and /dev/net/tun; without them run rootless with --userspace)"
    )]
    Create {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {name} already exists (another `nexodus join`?): pick another name with --interface NAME, or run rootless with --userspace"
    )]
    InUse { name: String },
}

/// Checks, before anything is registered, that `name` can be created here: it does
/// not exist yet, and a TUN device of that name can be made (privileges,
/// `/dev/net/tun`). The trial device disappears when it is closed, at once.
pub fn preflight(name: &str) -> Result<(), TunError> {
    if std::path::Path::new("/sys/class/net").join(name).exists() {
        return Err(TunError::InUse { name: name.into() });
    }
    let trial = tun_rs::DeviceBuilder::new()
        .name(name)
        .build_sync()
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY | libc::EEXIST) => TunError::InUse { name: name.into() },
            _ => TunError::Create {
                name: name.into(),
                source,
            },
        })?;
    drop(trial);
    Ok(())
}

/// Creates and brings up the interface, with TUN offload (virtio header, TSO/GRO)
/// when the kernel has it.
pub fn create(
    name: &str,
    mtu: u16,
    v4: Ipv4Addr,
    v6: Option<(Ipv6Addr, u8)>,
) -> Result<SyncDevice, TunError> {
    build(name, mtu, Some(v4), v6)
}

/// Creates the interface with no address (`nexodus wg`: `ip` or `wg-quick` adds them),
/// with TUN offload when the kernel has it.
pub fn create_bare(name: &str, mtu: u16) -> Result<SyncDevice, TunError> {
    build(name, mtu, None, None)
}

fn build(
    name: &str,
    mtu: u16,
    v4: Option<Ipv4Addr>,
    v6: Option<(Ipv6Addr, u8)>,
) -> Result<SyncDevice, TunError> {
    let build = |offload: bool| {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload);
        if let Some(v4) = v4 {
            builder = builder.ipv4(v4, 32u8, None);
        }
        if let Some((addr, prefix)) = v6 {
            builder = builder.ipv6(addr, prefix);
        }
        builder.build_sync()
    };
    let dev = match build(true) {
        Ok(dev) => dev,
        Err(e) => {
            tracing::warn!(error = %e, "TUN offload unavailable; using plain packet I/O");
            build(false).map_err(|source| TunError::Create {
                name: name.into(),
                source,
            })?
        }
    };
    dev.set_nonblocking(true)
        .map_err(|source| TunError::Create {
            name: name.into(),
            source,
        })?;
    Ok(dev)
}

/// Where the data path reads and writes IP packets: the kernel's TUN device, or the
/// data-path end of an in-process packet pipe whose other end is a userspace TCP/IP
/// stack (rootless mode: no TUN, no capabilities; [`crate::io::packet_pipe`]).
pub enum PacketDevice {
    Tun(SyncDevice),
    Pipe(crate::io::packet_pipe::End),
}

impl PacketDevice {
    /// Packets carry a virtio header (TUN offload on).
    pub fn offload(&self) -> bool {
        match self {
            Self::Tun(t) => t.tcp_gso(),
            Self::Pipe(_) => false,
        }
    }

    /// Reads a batch: with offload one read may yield many segments in `bufs`.
    pub fn recv_multiple(
        &self,
        original: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
        offset: usize,
    ) -> std::io::Result<usize> {
        match self {
            Self::Tun(t) => t.recv_multiple(original, bufs, sizes, offset),
            Self::Pipe(p) => p.recv_into(bufs, sizes, offset),
        }
    }

    /// Writes a batch (GRO-coalesced on a TUN with offload).
    pub fn send_multiple<B: tun_rs::ExpandBuffer>(
        &self,
        gro: &mut tun_rs::GROTable,
        bufs: &mut [B],
        offset: usize,
    ) -> std::io::Result<usize> {
        match self {
            Self::Tun(t) => t.send_multiple(gro, bufs, offset),
            Self::Pipe(p) => p.send_from(bufs, offset),
        }
    }
}

impl std::os::fd::AsRawFd for PacketDevice {
    /// What the data path polls: the TUN device, or the pipe end's eventfd.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Self::Tun(t) => t.as_raw_fd(),
            Self::Pipe(p) => p.wake_fd().as_raw_fd(),
        }
    }
}
