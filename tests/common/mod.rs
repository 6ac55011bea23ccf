//! Shared harness for end-to-end tests: runs the real `nexodus` binary and cleans up
//! on every exit path (Drop), with bounded waits instead of sleeps.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexodus::client::ControlClient;
use nexodus::coord::token::JoinToken;
use nexodus::wire::control::{RegisterRequest, Request, Response};

pub mod cluster;
pub mod netns;
pub mod probe;
pub mod proc;
pub mod stock;
pub mod systemd;

pub const BIN: &str = env!("CARGO_BIN_EXE_nexodus");

/// Retries `f` until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Runs an async test body; fails the test if it takes longer than `limit`.
pub async fn within<F: std::future::Future>(limit: Duration, body: F) -> F::Output {
    tokio::time::timeout(limit, body)
        .await
        .expect("test deadline")
}

/// A test's own time limit; every wait is bounded by what is left of it.
#[derive(Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn after(d: Duration) -> Self {
        Self(Instant::now() + d)
    }

    /// `cap`, or what is left of the test's time if that is less.
    pub fn left(self, cap: Duration) -> Duration {
        cap.min(self.0.saturating_duration_since(Instant::now()))
    }

    /// Fails the test if its deadline has passed.
    pub fn check(self, what: &str) {
        assert!(
            Instant::now() < self.0,
            "test deadline passed during {what}"
        );
    }
}

/// Polls `f` every 100 ms until it returns Some; fails the test after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes a child process die with the test process, even if the test aborts.
pub trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

/// A coordinator process on a loopback address of its own: on SQLite in a state
/// directory of its own, or a replica on a PostgreSQL database.
pub struct Coordinator {
    pub ip: IpAddr,
    pub addr: SocketAddr,
    pub stun: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The `serve` flags naming the store.
    store: Vec<String>,
    /// The process's log file; None: its stderr is the test's.
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

impl Coordinator {
    fn new(ip: &str, store: Option<Vec<String>>, log: Option<PathBuf>) -> Self {
        let ip: IpAddr = ip.parse().expect("test ip");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store.unwrap_or_else(|| {
            vec![
                "--state-dir".into(),
                dir.path().to_string_lossy().into_owned(),
            ]
        });
        Self {
            ip,
            addr: SocketAddr::new(ip, 4443),
            stun: SocketAddr::new(ip, 3478),
            dir,
            store,
            log,
            child: None,
        }
    }

    /// Starts `nexodus serve` on `ip` (a loopback address unique to the test).
    pub async fn start(ip: &str) -> Self {
        let mut c = Self::new(ip, None, None);
        c.spawn().await;
        c
    }

    /// [`Coordinator::start`] with more `serve` flags (e.g. `--api-listen`).
    pub async fn start_with(ip: &str, extra: &[&str]) -> Self {
        let mut c = Self::new(ip, None, None);
        c.store.extend(extra.iter().map(ToString::to_string));
        c.spawn().await;
        c
    }

    /// Starts a replica on database `url` at `ip` (QUIC 4443, STUN 3478/3479), its log
    /// in `logdir`, and waits until it runs.
    pub fn replica(ip: &str, url: &str, logdir: &Path) -> Self {
        Self::replica_with(ip, url, logdir, &[])
    }

    /// [`Coordinator::replica`] with more `serve` flags.
    pub fn replica_with(ip: &str, url: &str, logdir: &Path, extra: &[&str]) -> Self {
        let store = ["--database-url", url]
            .into_iter()
            .chain(extra.iter().copied())
            // Must not be used: the identity lives in the database.
            .chain(["--state-dir", "/nonexistent/nexodus-test"])
            .map(String::from)
            .collect();
        let log = logdir.join(format!("replica-{ip}.log"));
        let mut c = Self::new(ip, Some(store), Some(log));
        c.spawn_process();
        wait_until("replica to start", Duration::from_secs(30), || {
            c.log_text().contains("coordinator running").then_some(())
        });
        c
    }

    /// A coordinator on SQLite in a fresh state directory, not started, its log
    /// (stdout and stderr) in `logdir`: for what happens before and at the first start.
    pub fn unstarted(ip: &str, logdir: &Path) -> Self {
        let log = logdir.join(format!("serve-{ip}.log"));
        Self::new(ip, None, Some(log))
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running `serve` process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts `serve` without waiting for anything ([`Coordinator::spawn`] waits).
    pub fn spawn_process(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", &self.addr.to_string()])
            .args(["--stun-listen", &self.stun.to_string()])
            .args(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(log) = &self.log {
            let file = std::fs::File::create(log).expect("log file");
            cmd.env("RUST_LOG", "info,nexodus=debug")
                .stdout(file.try_clone().expect("log fd"))
                .stderr(file);
        } else {
            cmd.env("RUST_LOG", "info").stderr(Stdio::inherit());
        }
        self.child = Some(cmd.die_with_parent().spawn().expect("spawn nexodus serve"));
    }

    /// (Re)starts the process on the same state and waits until it answers.
    pub async fn spawn(&mut self) {
        self.spawn_process();
        let fp = self.fingerprint();
        let addr = self.addr;
        wait_for(
            "coordinator to answer",
            Duration::from_secs(20),
            || async move {
                let c = ControlClient::connect(addr, fp).await.ok()?;
                matches!(c.call(&Request::Ping).await, Ok(Response::Pong)).then_some(())
            },
        )
        .await;
    }

    /// The log so far (empty when it goes to the test's stderr).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGTERM, as systemd stops it; waits at most `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        proc::signal(&child, libc::SIGTERM);
        let status = proc::exit_within(&mut child, timeout);
        proc::kill(child);
        status
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.take() {
            proc::kill(c);
        }
    }

    /// The coordinator certificate fingerprint (the identity exists once `serve` ran).
    pub fn fingerprint(&self) -> [u8; 32] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(der) = std::fs::read(self.dir.path().join("coordinator-cert.der")) {
                return nexodus::identity::fingerprint(&der);
            }
            assert!(Instant::now() < deadline, "no coordinator identity");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs an admin command against this coordinator's SQLite state; returns stdout.
    pub fn admin(&self, args: &[&str]) -> Result<String, String> {
        let dir = self.dir.path().to_string_lossy();
        admin_command(args, &["--state-dir", &dir])
    }

    pub fn token(&self, extra: &[&str]) -> JoinToken {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        let text = self.admin(&args).expect("token create");
        JoinToken::parse(text.trim()).expect("token parses")
    }

    /// [`Coordinator::start`], then a token made with `token_args` and a client.
    pub async fn with_client(ip: &str, token_args: &[&str]) -> (Self, JoinToken, ControlClient) {
        let coord = Self::start(ip).await;
        let token = coord.token(token_args);
        let client = coord.client().await;
        (coord, token, client)
    }

    pub async fn client(&self) -> ControlClient {
        ControlClient::connect(self.addr, self.fingerprint())
            .await
            .expect("connect")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A registration request with a fresh key.
/// Runs `nexodus ARGS STORE_FLAGS` (an admin command; STORE_FLAGS say which state or
/// database); returns stdout, or stderr if it failed.
pub fn admin_command(args: &[&str], store_flags: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(args)
        .args(store_flags)
        .output()
        .expect("run admin command");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// User + system CPU time of a process, in clock ticks (None once it is gone).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": utime and stime are fields 14 and 15 of the line.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(t > 0, "sysconf(_SC_CLK_TCK) failed");
    t as f64
}

/// No tunnel address, v4 or v6, is held by two of `devices`.
pub fn assert_unique_addresses(devices: &[nexodus::wire::control::Device]) {
    use std::collections::HashSet;
    let v4: HashSet<_> = devices.iter().map(|d| d.tunnel_ip).collect();
    let v6: HashSet<_> = devices.iter().filter_map(|d| d.tunnel_ip_v6).collect();
    assert_eq!(v4.len(), devices.len(), "a v4 address is live twice");
    assert_eq!(v6.len(), devices.len(), "a v6 address is live twice");
}

/// (id, v4, v6) of each device: what answers and storage must agree on.
pub fn address_set(
    devices: &[nexodus::wire::control::Device],
) -> std::collections::HashSet<(i64, std::net::Ipv4Addr, Option<std::net::Ipv6Addr>)> {
    devices
        .iter()
        .map(|d| (d.id, d.tunnel_ip, d.tunnel_ip_v6))
        .collect()
}

pub fn register_request(token: &JoinToken, hostname: &str, seed: u64) -> RegisterRequest {
    // Distinct seeds must give distinct keys: hash, since clamping drops low bits.
    use sha2::Digest;
    let bytes: [u8; 32] = sha2::Sha256::digest(seed.to_le_bytes()).into();
    let secret = boringtun::x25519::StaticSecret::from(bytes);
    let public = boringtun::x25519::PublicKey::from(&secret);
    RegisterRequest {
        token_secret: token.secret_text(),
        public_key: nexodus::coord::keys::encode_key(public.as_bytes()),
        hostname: hostname.into(),
        os: "linux".into(),
        ipv6_supported: true,
        ..Default::default()
    }
}
