//! The node's TUN interface (tun-rs): created with its v4 address as /32 and its v6
//! address as /64 (which gives the kernel route for the organization's v6 prefix).
//! Closing the device removes the interface and every route through it.

use std::io::IoSlice;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};

pub use super::packet_pipe::Written;
use crate::wire::gro::{self, Coalescer};

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

    /// Whether a TUN with offload takes UDP super-packets (`TUN_F_USO4/6`).
    pub fn udp_offload(&self) -> bool {
        match self {
            Self::Tun(t) => t.tcp_gso() && t.udp_gso(),
            Self::Pipe(_) => false,
        }
    }

    /// Writes a batch, each packet `bufs[i][offset..]`. On a TUN with offload the
    /// packets are grouped by `gro` ([`crate::wire::gro`]) and each group goes in one
    /// vectored write behind its virtio header (the `offset` bytes before a packet
    /// are not read). Packets the kernel or the pipe refused are counted in
    /// [`Written::dropped`]; an error is returned only for a device that is gone
    /// (the TUN's `EBADFD`/`EIO`/`ENODEV`, the pipe's `BrokenPipe`).
    pub fn send_batch<B: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        gro: &mut Coalescer,
        bufs: &mut [B],
        offset: usize,
    ) -> std::io::Result<Written> {
        match self {
            Self::Tun(t) if t.tcp_gso() => write_coalesced(t.as_raw_fd(), gro, bufs, offset),
            Self::Tun(t) => {
                let mut written = Written::default();
                for b in bufs.iter() {
                    let packet = b.as_ref().get(offset..).unwrap_or_default();
                    count(
                        &mut written,
                        write_vectored(t.as_raw_fd(), &[IoSlice::new(packet)]),
                        1,
                    )?;
                }
                Ok(written)
            }
            Self::Pipe(p) => p.send_from(bufs, offset),
        }
    }
}

/// Counts one TUN write of `packets` packets in `written`; passes on the errors of a
/// device that is gone.
fn count(
    written: &mut Written,
    result: std::io::Result<usize>,
    packets: usize,
) -> std::io::Result<()> {
    match result {
        Ok(_) => written.sent += packets,
        Err(e) if tun_gone(&e) => return Err(e),
        Err(e) => {
            tracing::trace!(error = %e, packets, "TUN write failed");
            written.dropped += packets;
        }
    }
    Ok(())
}

/// A TUN error after which the device will never work again (deleted interface:
/// `EBADFD`; a device torn down under us: `EIO`, `ENODEV`, `ENXIO`).
pub fn tun_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::EIO | libc::ENODEV | libc::ENXIO)
    )
}

/// Most packets one coalesced write carries: the batch a [`Coalescer`] plans.
pub const MAX_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

const _: () = assert!(gro::VIRTIO_HDR_LEN == tun_rs::VIRTIO_NET_HDR_LEN);

/// A [`Coalescer`] for batches of up to [`MAX_BATCH`] packets on this device.
pub fn coalescer(dev: &PacketDevice) -> Coalescer {
    Coalescer::with_capacity(MAX_BATCH, dev.udp_offload())
}

fn write_coalesced<B: AsRef<[u8]> + AsMut<[u8]>>(
    fd: RawFd,
    gro: &mut Coalescer,
    bufs: &mut [B],
    offset: usize,
) -> std::io::Result<Written> {
    gro.plan(bufs, offset);
    let packet = |i: usize, skip: usize| {
        bufs.get(i)
            .and_then(|b| b.as_ref().get(offset + skip..))
            .unwrap_or_default()
    };
    let mut written = Written::default();
    for w in gro.writes() {
        let header = w.header;
        let mut iov = [IoSlice::new(&[]); MAX_BATCH + 1];
        let mut n = 0;
        for (slot, bytes) in iov.iter_mut().zip(
            std::iter::once(&header[..])
                .chain(std::iter::once(packet(w.head, 0)))
                .chain(w.members().map(|m| packet(m, w.skip))),
        ) {
            *slot = IoSlice::new(bytes);
            n += 1;
        }
        count(
            &mut written,
            write_vectored(fd, iov.get(..n).unwrap_or_default()),
            w.count,
        )?;
    }
    let none = [0u8; gro::VIRTIO_HDR_LEN];
    for i in gro.planned(bufs.len())..bufs.len() {
        let result = write_vectored(fd, &[IoSlice::new(&none), IoSlice::new(packet(i, 0))]);
        count(&mut written, result, 1)?;
    }
    Ok(written)
}

/// One `writev(2)`: a TUN takes it as one packet.
fn write_vectored(fd: RawFd, iov: &[IoSlice<'_>]) -> std::io::Result<usize> {
    let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix, and every one
    // of the `count` entries points at memory borrowed for this call.
    let n = unsafe { libc::writev(fd, iov.as_ptr().cast::<libc::iovec>(), count) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
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
