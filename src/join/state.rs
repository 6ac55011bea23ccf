//! The node's durable state: WireGuard private key, device id and credential, listen
//! port and the pinned coordinator fingerprint. One JSON file, 0600, written
//! atomically, so a restart keeps key, addresses and port, and a crash never leaves a
//! torn file.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::fsutil;

pub const STATE_FILE: &str = "node.json";
/// Held (`flock`, with the pid) by the one `nexodus join` using the state directory.
pub const LOCK_FILE: &str = "node.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read or write node state {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node state {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "node state directory {} is in use by another `nexodus join` ({}); a cloned machine \
         or container must join with a state directory of its own (--state-dir) and its own \
         --token",
        dir.display(), fsutil::holder(*.pid)
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error(transparent)]
    Lock(fsutil::LockError),
}

/// Takes the node state directory for this process (until the lock is dropped): a
/// second `join` on the same directory, such as a cloned VM's, is refused at once.
pub fn lock(dir: &Path) -> Result<fsutil::Lock, StateError> {
    fsutil::ensure_private_dir(dir).map_err(|source| StateError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    fsutil::Lock::try_take(&dir.join(LOCK_FILE), fsutil::LockMode::Exclusive, true).map_err(|e| {
        match e {
            fsutil::LockError::Held { pid, .. } => StateError::InUse {
                dir: dir.to_path_buf(),
                pid,
            },
            e => StateError::Lock(e),
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// WireGuard private key, base64.
    pub private_key: String,
    pub listen_port: u16,
    #[serde(default)]
    pub device_id: Option<i64>,
    #[serde(default)]
    pub credential: Option<String>,
    /// SHA-256 of the coordinator certificate, hex.
    #[serde(default)]
    pub coordinator_fingerprint: Option<String>,
}

impl NodeState {
    pub fn new(private_key: [u8; 32], listen_port: u16) -> Self {
        Self {
            private_key: STANDARD.encode(private_key),
            listen_port,
            device_id: None,
            credential: None,
            coordinator_fingerprint: None,
        }
    }

    pub fn private_key_bytes(&self) -> Option<[u8; 32]> {
        STANDARD.decode(&self.private_key).ok()?.try_into().ok()
    }

    pub fn fingerprint_bytes(&self) -> Option<[u8; 32]> {
        let hex = self.coordinator_fingerprint.as_deref()?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    /// Loads the state from `dir`, or `None` if there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match fsutil::read_nofollow(&path) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: Self = serde_json::from_slice(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.private_key_bytes().is_none() {
            return Err(StateError::Corrupt {
                path,
                reason: "private_key is not 32 bytes of base64".into(),
            });
        }
        Ok(Some(state))
    }

    /// Writes the state atomically with mode 0600.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: dir.join(STATE_FILE),
            source,
        };
        fsutil::ensure_private_dir(dir).map_err(io)?;
        let text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Corrupt {
            path: dir.join(STATE_FILE),
            reason: e.to_string(),
        })?;
        fsutil::write_private_atomic(&dir.join(STATE_FILE), &text).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeState::load(dir.path()).unwrap(), None);
        let mut s = NodeState::new([9; 32], 51820);
        s.device_id = Some(3);
        s.coordinator_fingerprint = Some(crate::coord::token::hex(&[0xab; 32]));
        s.save(dir.path()).unwrap();
        let back = NodeState::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(back.private_key_bytes(), Some([9; 32]));
        assert_eq!(back.fingerprint_bytes(), Some([0xab; 32]));
        let held = lock(dir.path()).unwrap();
        let refused = lock(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("pid {}", std::process::id())),
            "{refused}"
        );
        assert!(refused.contains("--state-dir"), "{refused}");
        drop(held);
        drop(lock(dir.path()).unwrap());
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        assert!(matches!(
            NodeState::load(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
        // A link in place of the state file: refused, its target untouched.
        let other = tempfile::tempdir().unwrap();
        let target = other.path().join("elsewhere.json");
        s.save(other.path()).unwrap();
        std::fs::rename(other.path().join(STATE_FILE), &target).unwrap();
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(STATE_FILE)).unwrap();
        let err = NodeState::load(dir.path()).unwrap_err();
        assert!(
            error_chain(&err).contains("is a symbolic link; state files are never read"),
            "{}",
            error_chain(&err)
        );
        assert_eq!(NodeState::load(other.path()).unwrap(), None);
        let before = std::fs::read(&target).unwrap();
        s.save(dir.path()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), before, "target untouched");
        assert!(
            !std::fs::symlink_metadata(dir.path().join(STATE_FILE))
                .unwrap()
                .is_symlink()
        );
    }

    fn error_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}
