//! A throwaway PostgreSQL server for tests and benchmarks (not part of the product).
//!
//! `initdb` into a fresh temp dir, then the postmaster as a child of this process,
//! listening on a loopback address with a port of its own (and a unix socket in the
//! temp dir). As root, both run as the `postgres` user (initdb refuses root). The
//! server is stopped and the dir removed on drop; the postmaster also gets SIGKILL if
//! the thread that started it dies (`PR_SET_PDEATHSIG`). Needs Debian's `postgresql`
//! package (`/usr/lib/postgresql/*/bin`, or set `NEXODUS_PG_BIN`).
//!
//! TLS mode ([`TempPostgres::start_tls`]): a test CA and a server certificate for the
//! listen address (and `localhost`) are made with rcgen at start, and the server runs
//! with `ssl=on`; [`TempPostgres::ca_file`] is the CA for `sslrootcert`.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

/// Database user made by initdb (trust authentication, superuser).
pub const USER: &str = "nexodus";

pub struct TempPostgres {
    dir: PathBuf,
    bin: PathBuf,
    /// Address the server listens on.
    pub host: String,
    pub port: u16,
    netns: Option<String>,
    /// (uid, gid) to run as, when started as root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// TLS on: the CA certificate (PEM file) the server's certificate is signed by.
    ca_file: Option<PathBuf>,
}

/// A certificate authority made for a test.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("CA key: {e}"))?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("CA certificate: {e}"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A server certificate for `names` (IP addresses or DNS names): (cert PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> Result<(String, String), String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("server key: {e}"))?;
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(|e| format!("server certificate names: {e}"))?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("db"),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("server certificate: {e}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA certificate to `path`.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        std::fs::write(path, &self.cert_pem).map_err(|e| format!("{}: {e}", path.display()))
    }
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("NEXODUS_PG_BIN") {
        return Ok(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!(
                "PostgreSQL is not installed (/usr/lib/postgresql: {e}); apt-get install postgresql"
            )
        })?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/postgres; apt-get install postgresql".into())
}

/// (uid, gid) of the `postgres` user.
fn postgres_user() -> Result<(u32, u32), String> {
    let name = c"postgres";
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("running as root but there is no `postgres` user to run PostgreSQL as".into());
    }
    // SAFETY: non-null, points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// A free TCP port on `host` (the OS picks it; races are caught by the retry in start).
fn free_port(host: &str) -> Result<u16, String> {
    let l = std::net::TcpListener::bind((host, 0)).map_err(|e| format!("bind {host}:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Runs `f` on a fresh thread: the sync PostgreSQL client must not run on an async
/// thread, and callers may be async tests.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

impl TempPostgres {
    /// A server on 127.0.0.1 with a free port.
    pub fn start() -> Result<Self, String> {
        Self::start_with("127.0.0.1", None)
    }

    /// A server listening on `host` inside network namespace `netns` (made with `ip
    /// netns add`; needs root), or in this process's namespace.
    pub fn start_with(host: &str, netns: Option<&str>) -> Result<Self, String> {
        Self::start_inner(host, netns, false)
    }

    /// Like [`Self::start_with`], with TLS on (`ssl=on`; a test CA, see the module docs).
    pub fn start_tls(host: &str, netns: Option<&str>) -> Result<Self, String> {
        Self::start_inner(host, netns, true)
    }

    fn start_inner(host: &str, netns: Option<&str>, tls: bool) -> Result<Self, String> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        // SAFETY: geteuid cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "nexodus-pg-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let mut pg = Self {
            dir,
            bin,
            host: host.into(),
            port: 0,
            netns: netns.map(Into::into),
            run_as,
            child: None,
            ca_file: None,
        };
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pg.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("chmod: {e}"))?;
        }
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", pg.dir.display()))?;
        }
        pg.initdb()?;
        if tls {
            pg.make_certificates()?;
        }
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = if netns.is_some() {
                5432
            } else {
                free_port(host)?
            };
            match pg.spawn() {
                Ok(()) => return Ok(pg),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The test CA and the server's certificate and key (0600, the server's user's,
    /// as PostgreSQL insists).
    fn make_certificates(&mut self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let ca = TestCa::new("nexodus test database CA")?;
        let (cert, key) = ca.issue(&[&self.host, "localhost"])?;
        let ca_file = self.dir.join("ca.pem");
        ca.write(&ca_file)?;
        for (name, pem) in [("server.crt", cert), ("server.key", key)] {
            let path = self.dir.join(name);
            std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
        }
        self.ca_file = Some(ca_file);
        Ok(())
    }

    /// The CA certificate (PEM file) of a server started with TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// A command run as the postgres user (if root), in the namespace, dying with the
    /// thread that spawns it.
    fn command(&self, program: &str) -> Result<Command, String> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.dir)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null());
        let netns = match &self.netns {
            Some(name) => Some(
                File::open(Path::new("/var/run/netns").join(name))
                    .map_err(|e| format!("network namespace {name}: {e}"))?,
            ),
            None => None,
        };
        let run_as = self.run_as;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = &netns
                    && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid)) = run_as
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                // After the uid change, which would clear it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    fn initdb(&self) -> Result<(), String> {
        let out = self
            .command("initdb")?
            .arg("-D")
            .arg(self.data())
            .args([
                "-A",
                "trust",
                "-U",
                USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Starts the postmaster on the data dir and waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), String> {
        let log = File::create(self.log()).map_err(|e| format!("log: {e}"))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(self.log(), Some(uid), Some(gid));
        }
        let child = self
            .command("postgres")?
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("listen_addresses={}", self.host))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
            // Throwaway data: no fsync (a fast shutdown still checkpoints, so a restart
            // keeps every commit; only an OS crash could lose them).
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(if self.ca_file.is_some() {
                vec![
                    "-c".to_string(),
                    "ssl=on".into(),
                    "-c".into(),
                    format!("ssl_cert_file={}", self.dir.join("server.crt").display()),
                    "-c".into(),
                    format!("ssl_key_file={}", self.dir.join("server.key").display()),
                ]
            } else {
                Vec::new()
            })
            .stdout(log.try_clone().map_err(|e| format!("log: {e}"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("postgres exited ({status}): {}", self.log_text()));
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("postgres did not start: {}", self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        off_runtime(|| {
            self.admin_config("postgres")
                .connect(postgres::NoTls)
                .is_ok()
        })
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Connection settings over the unix socket (works across network namespaces).
    fn admin_config(&self, dbname: &str) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host_path(&self.dir)
            .port(self.port)
            .user(USER)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        c
    }

    /// Creates an empty database.
    pub fn create_database(&self, name: &str) -> Result<(), String> {
        off_runtime(|| {
            let mut c = self
                .admin_config("postgres")
                .connect(postgres::NoTls)
                .map_err(|e| format!("connect: {e}"))?;
            c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .map_err(|e| format!("create database {name}: {e}"))
        })
    }

    /// URL of database `name` over TCP on the listen address.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@{}:{}/{name}", self.host, self.port)
    }

    /// URL of database `name` over TCP with TLS, the server's certificate checked as
    /// `sslmode` says against the test CA (a server started with TLS).
    pub fn tls_url(&self, name: &str, sslmode: &str) -> String {
        match &self.ca_file {
            Some(ca) => format!(
                "{}?sslmode={sslmode}&sslrootcert={}",
                self.url(name),
                ca.display()
            ),
            None => format!("{}?sslmode={sslmode}", self.url(name)),
        }
    }

    /// A new empty database and its URL.
    pub fn fresh_database(&self, name: &str) -> Result<String, String> {
        self.create_database(name)?;
        Ok(self.url(name))
    }

    /// Runs SQL as superuser on database `name` (over the unix socket); returns the
    /// first column of each row as text.
    pub fn query(&self, name: &str, sql: &str) -> Result<Vec<String>, String> {
        off_runtime(|| {
            let mut c = self
                .admin_config(name)
                .connect(postgres::NoTls)
                .map_err(|e| format!("connect: {e}"))?;
            let rows = c.simple_query(sql).map_err(|e| format!("{sql}: {e}"))?;
            Ok(rows
                .into_iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).unwrap_or("").to_string())
                    }
                    _ => None,
                })
                .collect())
        })
    }

    /// Fast shutdown (SIGINT: sessions are ended, committed data stays), waited for.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGINT);
    }

    /// Stops the postmaster with `signal` (SIGINT fast, SIGQUIT immediate) and waits
    /// until it (and so every backend) has exited.
    fn stop_with(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, signal) };
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(c.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }

    /// Starts the stopped server again on the same data and port.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The directory of the server's unix socket (`host=` in a connection string).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The postmaster's pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server at once and removes its files (what drop does).
    pub fn shutdown(&mut self) {
        self.stop_with(libc::SIGQUIT);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.shutdown();
    }
}
