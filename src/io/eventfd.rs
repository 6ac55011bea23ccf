//! Linux eventfds as thread wake-ups: a counter the kernel makes pollable. One thread
//! [`signal`]s; the other polls the fd and [`drain`]s it (resets the counter) before
//! looking at what it was woken for, so a signal sent after the drain is never lost.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// A new non-blocking, close-on-exec eventfd.
pub fn new() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative return is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the eventfd readable (adds one to its counter).
pub fn signal(fd: impl AsFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a valid eventfd.
    let _ = unsafe { libc::write(fd.as_fd().as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

/// Resets the counter (the fd is no longer readable). True if it had been signalled.
pub fn drain(fd: impl AsFd) -> bool {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a valid non-blocking eventfd.
    let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
    n == 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_then_drain_resets() {
        let fd = new().expect("eventfd");
        assert!(!drain(&fd));
        signal(&fd);
        signal(&fd);
        assert!(drain(&fd));
        assert!(!drain(&fd));
    }
}
