//! Child processes of a test: killed (SIGKILL) and reaped on drop, so no exit path
//! leaves one behind; every wait for an exit is bounded.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::DieWithParent;

/// Waits at most `timeout` for `child` to exit; None if it still runs.
pub fn exit_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to `child` (which has not been reaped yet).
pub fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill has no memory effects; the pid is our unreaped child.
    unsafe { libc::kill(pid, signal) };
}

/// SIGKILL and reap.
pub fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd` with stdin closed, dying with the test process.
fn spawn(mut cmd: Command, stdout: Stdio, stderr: Stdio) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .die_with_parent()
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `cmd` (stdin closed, stdout discarded), which must exit within `timeout` and
/// fail; returns its stderr. `what` names it in the test's failures.
pub fn assert_fails_within(cmd: Command, timeout: Duration, what: &str) -> String {
    let mut child = spawn(cmd, Stdio::null(), Stdio::piped());
    let code = exit_within(&mut child, timeout);
    if code.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for child");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = code.unwrap_or_else(|| panic!("{what}: still running after {timeout:?}: {stderr}"));
    assert!(!code.success(), "{what} was accepted: {stderr}");
    stderr
}

/// A child process killed and reaped on drop; its output (stdout and stderr) in a
/// file, piped, or discarded.
pub struct Proc {
    child: Option<Child>,
    out: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` with its output in the file `out`.
    pub fn spawn(cmd: Command, out: PathBuf) -> Self {
        let file = std::fs::File::create(&out).expect("output file");
        let child = spawn(
            cmd,
            file.try_clone().expect("output fd").into(),
            file.into(),
        );
        Self::adopt(child, Some(out))
    }

    /// Spawns `cmd` with its output discarded.
    pub fn quiet(cmd: Command) -> Self {
        Self::adopt(spawn(cmd, Stdio::null(), Stdio::null()), None)
    }

    /// Takes over a child spawned elsewhere, whose output (if any) goes to `out`.
    pub fn adopt(child: Child, out: Option<PathBuf>) -> Self {
        Self {
            child: Some(child),
            out,
        }
    }

    /// The output so far (empty unless it goes to a file).
    pub fn output(&self) -> String {
        self.out
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Waits at most `timeout` for the exit (killing it then); returns whether it
    /// exited successfully and its output.
    pub fn finish(mut self, timeout: Duration) -> (bool, String) {
        let mut child = self.child.take().expect("process running");
        let ok = exit_within(&mut child, timeout).is_some_and(|s| s.success());
        kill(child);
        (ok, self.output())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            kill(c);
        }
    }
}
