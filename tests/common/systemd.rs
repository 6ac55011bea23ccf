//! A booted systemd (PID 1) in a throwaway container: `systemd-nspawn` on a
//! copy-on-write overlay of this host's root, with a private network, for tests of
//! what needs a real systemd (the packaged units, systemd-resolved).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The container's number in its directory name (`…-N`), for its machine name.
fn dir_n(dir: &Path) -> String {
    dir.to_string_lossy()
        .rsplit('-')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A booted systemd container on an overlay of `/` (changes go to a temporary upper
/// directory; the host is untouched). Dropped: killed, unmounted and removed.
pub struct SystemdContainer {
    dir: std::path::PathBuf,
    nspawn: std::process::Child,
    leader: u32,
}

const CONTAINER_DEADLINE: Duration = Duration::from_secs(90);

impl SystemdContainer {
    /// Boots a container; `binds` are `(host path, path inside)`, read-only.
    pub fn boot(binds: &[(&Path, &str)]) -> SystemdContainer {
        let dir = std::path::PathBuf::from(format!(
            "/var/tmp/nexodus-sd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = Command::new("umount")
            .arg("-l")
            .arg(dir.join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["up", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create overlay directories");
        }
        let options = format!(
            "lowerdir=/,upperdir={},workdir={}",
            dir.join("up").display(),
            dir.join("work").display()
        );
        let mounted = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(dir.join("root"))
            .status()
            .expect("mount");
        assert!(mounted.success(), "overlay mount of / failed");
        let log = std::fs::File::create(dir.join("console.log")).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(dir.join("root"))
            .arg(format!(
                "--machine=nxsd{}-{}",
                std::process::id(),
                dir_n(&dir)
            ))
            .args(["--register=no", "--keep-unit", "--link-journal=no"])
            .arg("--private-network")
            .args(
                binds
                    .iter()
                    .map(|(host, inside)| format!("--bind-ro={}:{inside}", host.display())),
            )
            // Services of the host's own that need not start in the container.
            .args(["--boot", "systemd.mask=postgresql.service"])
            .arg("systemd.mask=prometheus.service")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (scripts/test installs systemd-container)");
        let mut container = SystemdContainer {
            dir,
            nspawn,
            leader: 0,
        };
        let pid = container.nspawn.id();
        // nspawn forks a short-lived helper before the container's init; the init is
        // the child that is PID 1 in a PID namespace of its own.
        container.leader = container.wait_for("the container's PID 1", || {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| is_namespace_init(*c))
        });
        container.wait_for("systemd to finish booting", || {
            let state = container.run(&["systemctl", "is-system-running"]);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        container
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.dir.join("root")
    }

    /// Runs a command inside the container; its stdout (stderr is logged on failure).
    pub fn run(&self, args: &[&str]) -> String {
        self.run_status(args).1
    }

    pub fn expect(&self, args: &[&str]) -> String {
        let (ok, out) = self.run_status(args);
        assert!(
            ok,
            "in the container, {args:?} failed:\n{out}\n{}",
            self.console()
        );
        out
    }

    pub fn run_status(&self, args: &[&str]) -> (bool, String) {
        // Every command is bounded: a hung systemctl fails the test, never stalls it.
        let out = Command::new("timeout")
            .args(["60", "nsenter", "--target"])
            .arg(self.leader.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--"])
            .args(args)
            .output()
            .expect("nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        (out.status.success(), text)
    }

    pub fn console(&self) -> String {
        let journal = if self.leader != 0 {
            self.run(&["journalctl", "--no-pager", "-n", "60", "-u", "nexodus-*"])
        } else {
            String::new()
        };
        let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "journal:\n{journal}\nconsole (last lines, newest first):\n{}",
            tail.join("\n")
        )
    }

    pub fn wait_for<T>(&self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + CONTAINER_DEADLINE;
        let mut delay = Duration::from_millis(50);
        loop {
            if let Some(v) = probe() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.console()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

/// Whether `pid` is PID 1 of a PID namespace below ours (`NSpid: <pid> 1`).
fn is_namespace_init(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| {
            ids.split_whitespace().last() == Some("1") && ids.split_whitespace().count() > 1
        })
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        // SIGKILL to the container's PID 1 ends every process in it; then nspawn exits.
        if self.leader != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg("-l").arg(self.root()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
