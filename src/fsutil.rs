//! Small filesystem helpers for state that must survive crashes: atomic, private
//! writes, private directories, and [`Lock`]s (`flock` on a lock file holding the
//! holder's pid) that say which process owns a state directory. It does not decide what
//! a lock protects: the coordinator and the node shells do.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Writes `data` to `path` atomically with mode 0600: a temporary file in the same
/// directory, fsync, rename over the target, fsync the directory. A crash leaves
/// either the old or the new content, never a torn file.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        // A stale temporary file (or a link planted in its place) goes; the new one is
        // made here, never opened through a link.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a state file without following a symbolic link in its place (a link is an
/// error saying so); `None` if there is no such file.
pub fn read_nofollow(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link; state files are never read through links \
                     (replace it with the file itself)",
                    path.display()
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(Some(data))
}

/// Creates `dir` (and parents) with mode 0700 if missing; an existing one must be
/// [`check_private_dir`]'s kind. Nothing is tightened silently.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return create_private_dir(dir);
    }
    check_private_dir(dir)
}

/// Creates `dir` (and parents) with mode 0700 if missing; an existing one is left as
/// it is (for directories that are not ours alone, such as a database's).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Refuses a state directory that someone else could change: not owned by this user,
/// or writable by group or others. The error names the directory and the fix.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if meta.uid() != me {
        return refuse(format!(
            "state directory {} is owned by uid {}, not by this user (uid {me}); \
             use a directory of your own (--state-dir) or `chown {me} {}`",
            dir.display(),
            meta.uid(),
            dir.display()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return refuse(format!(
            "state directory {} is writable by group or others (mode {mode:04o}); \
             restrict it: chmod go-w {}",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The default state directory: `/var/lib/nexodus` for root, else
/// `$XDG_STATE_HOME/nexodus` (or `~/.local/state/nexodus`).
pub fn default_state_dir() -> std::path::PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return "/var/lib/nexodus".into();
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Path::new(&x).join("nexodus");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return Path::new(&h).join(".local/state/nexodus");
    }
    "nexodus-state".into()
}

/// A held `flock` on a lock file; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    file: File,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; `pid` is what the holder wrote into the file.
    #[error("{path} is held by {}", holder(*.pid))]
    Held { path: PathBuf, pid: Option<u32> },
    /// The lock file does not exist (and was not to be created).
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot use lock file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// The holder's pid, if the lock is held by another process and it wrote one.
    pub fn holder_pid(&self) -> Option<u32> {
        match self {
            Self::Held { pid, .. } => *pid,
            _ => None,
        }
    }
}

/// "pid N" or "another process" for messages.
pub fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "another process".into(), |p| format!("pid {p}"))
}

/// Whether a lock is taken shared (readers) or exclusive (one owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

impl Lock {
    /// Takes `mode` on `path` without waiting. `create`: make the file (0600) if
    /// missing, else a missing file is [`LockError::Missing`]. An exclusive lock
    /// writes our pid into the file for the messages of those refused. The file is
    /// opened with `O_NOFOLLOW`: a symlink planted in its place is refused.
    pub fn try_take(path: &Path, mode: LockMode, create: bool) -> Result<Self, LockError> {
        let io = |source: io::Error| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = match OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LockError::Missing {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    pid: read_pid(&mut file),
                });
            }
            return Err(io(err));
        }
        if mode == LockMode::Exclusive && create {
            file.set_len(0).map_err(io)?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(io)?;
        }
        Ok(Self { file })
    }

    /// As [`Lock::try_take`], waiting up to `wait` while another process holds it;
    /// `on_wait` is called once, with the holder's pid, when the wait begins.
    pub fn take_within(
        path: &Path,
        mode: LockMode,
        create: bool,
        wait: Duration,
        mut on_wait: impl FnMut(Option<u32>),
    ) -> Result<Self, LockError> {
        let deadline = Instant::now() + wait;
        let mut told = false;
        loop {
            match Self::try_take(path, mode, create) {
                Err(LockError::Held { pid, .. }) if Instant::now() < deadline => {
                    if !std::mem::replace(&mut told, true) {
                        on_wait(pid);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Lets go of the lock before the end of the process.
    pub fn release(self) {
        drop(self.file);
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_names_its_holder_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        assert!(matches!(
            Lock::try_take(&p, LockMode::Shared, false),
            Err(LockError::Missing { .. })
        ));
        let held = Lock::try_take(&p, LockMode::Exclusive, true).unwrap();
        // flock locks belong to the open file description: a second open conflicts
        // even in one process.
        let err = Lock::try_take(&p, LockMode::Exclusive, true).unwrap_err();
        assert_eq!(err.holder_pid(), Some(std::process::id()));
        assert!(
            Lock::try_take(&p, LockMode::Shared, false)
                .unwrap_err()
                .to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
        let mut waited = None;
        let start = Instant::now();
        let err = Lock::take_within(
            &p,
            LockMode::Shared,
            false,
            Duration::from_millis(100),
            |pid| waited = Some(pid),
        )
        .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(waited, Some(Some(std::process::id())));
        assert!(matches!(err, LockError::Held { .. }));
        held.release();
        let a = Lock::try_take(&p, LockMode::Shared, false).unwrap();
        let b = Lock::try_take(&p, LockMode::Shared, false).unwrap();
        drop((a, b));
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            Lock::try_take(&link, LockMode::Exclusive, true),
            Err(LockError::Io { .. })
        ));
    }

    #[test]
    fn state_file_behind_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"secret").unwrap();
        let key = dir.path().join("coordinator-key.der");
        std::os::unix::fs::symlink(&target, &key).unwrap();
        let err = read_nofollow(&key).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{} is a symbolic link; state files are never read through links \
                 (replace it with the file itself)",
                key.display()
            )
        );
        assert_eq!(read_nofollow(&dir.path().join("none")).unwrap(), None);
        assert_eq!(read_nofollow(&target).unwrap().unwrap(), b"secret");
        // A link planted where the temporary file of an atomic write goes.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let p = dir.path().join("k");
        let tmp = dir.path().join(format!(".k.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_private_atomic(&p, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::read(&target).unwrap(), b"secret");
    }

    #[test]
    fn shared_state_dir_is_refused_not_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        ensure_private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o775)).unwrap();
        let err = ensure_private_dir(&d).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "state directory {} is writable by group or others (mode 0775); \
                 restrict it: chmod go-w {}",
                d.display(),
                d.display()
            )
        );
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o775,
            "nothing tightened silently"
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&d).unwrap();
        // Owned by someone else (only root can make one).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
            let err = ensure_private_dir(&d).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "state directory {} is owned by uid 65534, not by this user (uid 0)",
                    d.display()
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn atomic_write_is_private_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private_atomic(&p, b"one").unwrap();
        write_private_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}
