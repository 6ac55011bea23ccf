//! `nexodus loadgen` (hidden): simulates many nodes against running coordinators.
//!
//! Every simulated node is a real QUIC connection (the nodes share a few UDP sockets)
//! that speaks the control protocol like `nexodus join` does: register with the token,
//! update its endpoints, hold a watch stream. Phases, each timed:
//!
//! 1. **register** N nodes, `--concurrency` at a time (connect + register);
//! 2. **update**: every node sets its endpoints once;
//! 3. **watch**: every node opens its watch stream and reads its snapshot
//!    (`--concurrency` snapshots in flight at once); then wait until no frame has
//!    arrived for a second (the online deltas have drained);
//! 4. **probes**: `--probes` times, one node changes its endpoints and every watcher
//!    notes when a frame carrying that change arrives. Reported: per watcher latency
//!    (p50/p99 over all watchers and probes) and the time until the last watcher had
//!    it (p50/p99 over probes).
//! 5. **storm** (with `--restart-cmd`): the command restarts the coordinator(s) (it
//!    prints the new process ids); every node then reconnects at once as `nexodus
//!    join` does (new connection, login, watch; on failure it retries with a jittered,
//!    doubling backoff). Reported: the time from the restart until every node had its
//!    snapshot (and p50/p99 per node), until the deltas drained, and the probes of
//!    phase 4 again, on the reconnected watchers.
//!
//! With `--coordinator-pid`, the coordinators' RSS (`/proc/PID/status`) is read before
//! and after, and divided by N. Nodes are spread round robin over the `--coordinator`
//! addresses (several replicas: a change then crosses replicas to reach everyone).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::coord::token::JoinToken;
use crate::identity;
use crate::quicio;
use crate::wire::control::{
    Auth, DeviceUpdate, RegisterRequest, Request, Response, ResumeFrom, SERVER_NAME,
};
use crate::wire::frame::{self, MAX_REQUEST_LEN, MAX_RESPONSE_LEN};
use crate::wire::peers;

mod report;
mod storm;

use report::percentile;
pub use report::{Report, StormReport};
use storm::run_storm;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Coordinator address(es), IP:PORT, comma separated; nodes are spread over them.
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        env = "NEXODUS_LOADGEN_COORDINATOR"
    )]
    pub coordinator: Vec<SocketAddr>,
    /// A reusable join token.
    #[arg(
        long,
        env = "NEXODUS_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    pub token: Option<String>,
    /// Read the join token from this file (as `join --token-file`).
    #[arg(
        long,
        env = "NEXODUS_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "token"
    )]
    pub token_file: Option<std::path::PathBuf>,
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000, env = "NEXODUS_LOADGEN_NODES")]
    pub nodes: usize,
    /// Requests in flight at once while registering and updating.
    #[arg(long, default_value_t = 64, env = "NEXODUS_LOADGEN_CONCURRENCY")]
    pub concurrency: usize,
    /// Changes timed from one node to every watcher.
    #[arg(long, default_value_t = 20, env = "NEXODUS_LOADGEN_PROBES")]
    pub probes: usize,
    /// Coordinator process id(s) whose memory to report, comma separated.
    #[arg(long, value_delimiter = ',', env = "NEXODUS_LOADGEN_PID")]
    pub coordinator_pid: Vec<u32>,
    /// UDP sockets (QUIC endpoints) the simulated nodes share.
    #[arg(long, default_value_t = 32, env = "NEXODUS_LOADGEN_SOCKETS")]
    pub sockets: usize,
    /// Name printed with the figures (e.g. the backend).
    #[arg(long, default_value = "", env = "NEXODUS_LOADGEN_LABEL")]
    pub label: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// After the probes, run this shell command to restart the coordinator(s) (it
    /// prints their new process ids, comma separated) and time every node
    /// reconnecting at once.
    #[arg(long, value_name = "COMMAND", env = "NEXODUS_LOADGEN_RESTART_CMD")]
    pub restart_cmd: Option<String>,
    /// Skip phases 3 and 4 (the first watches and probes): register, update, then
    /// the storm straight away.
    #[arg(long, requires = "restart_cmd")]
    pub storm_only: bool,
    /// In the storm, reconnect without naming the revision each node had (every node
    /// is sent the whole snapshot, as older nodes are). By default nodes resume as
    /// `nexodus join` does. With `--storm-only` (no first watches) every node is taken
    /// to be current at the revision one watch reads after the updates.
    #[arg(long)]
    pub no_resume: bool,
}

#[derive(Debug, Error)]
pub enum LoadgenError {
    #[error("bad join token: {0}")]
    Token(#[from] crate::coord::token::TokenError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("QUIC endpoint: {0}")]
    Bind(std::io::Error),
    #[error("node {node}: {what}")]
    Node { node: usize, what: String },
    #[error("{0}")]
    Timeout(String),
}

/// VmRSS of a process in KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One simulated node.
struct Node {
    /// Its control connection (a storm node that lost it reconnects: a new one).
    conn: Mutex<quinn::Connection>,
    auth: Auth,
    /// Where its view of the organization stands (kept by its watch stream).
    view: View,
}

impl Node {
    fn conn(&self) -> quinn::Connection {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A node's [`ResumeFrom`], updated by its watch stream as frames arrive.
type View = Arc<Mutex<ResumeFrom>>;

/// What the watchers share with the probe driver.
struct Probe {
    active: AtomicBool,
    /// The bytes that mark the current probe's change in a frame.
    marker: Mutex<Vec<u8>>,
    started: Mutex<Instant>,
    seq: AtomicU64,
    /// (watcher, latency) for the current probe.
    seen: Mutex<Vec<Duration>>,
    seen_count: AtomicUsize,
    snapshots: AtomicUsize,
    /// When each snapshot arrived (the storm's figures).
    snapshot_times: Mutex<Vec<Instant>>,
    last_frame: Mutex<Instant>,
    errors: Mutex<Vec<String>>,
    /// Storm watch streams that ended after their first frame, and why.
    lost: Mutex<Vec<String>>,
}

impl Probe {
    fn new() -> Self {
        Self {
            active: AtomicBool::new(false),
            marker: Mutex::new(Vec::new()),
            started: Mutex::new(Instant::now()),
            seq: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            seen_count: AtomicUsize::new(0),
            snapshots: AtomicUsize::new(0),
            snapshot_times: Mutex::new(Vec::new()),
            last_frame: Mutex::new(Instant::now()),
            errors: Mutex::new(Vec::new()),
            lost: Mutex::new(Vec::new()),
        }
    }
}

async fn call(conn: &quinn::Connection, req: &Request) -> Result<Response, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    quicio::write_message(&mut send, req, MAX_REQUEST_LEN)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut buf = Vec::new();
    match quicio::read_message(&mut recv, MAX_RESPONSE_LEN, &mut buf).await {
        Ok(Some(Response::Error { code, message })) => Err(format!("{code:?}: {message}")),
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err("no answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

async fn register_node(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    req: &Request,
) -> Result<Node, String> {
    let conn = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match call(&conn, req)
        .await
        .map_err(|e| format!("register: {e}"))?
    {
        Response::Registered { device, credential } => Ok(Node {
            conn: Mutex::new(conn),
            auth: Auth {
                device_id: device.id,
                credential,
            },
            view: Arc::new(Mutex::new(ResumeFrom {
                database: 0,
                organization_id: device.organization_id,
                revision: 0,
            })),
        }),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

fn register_request(token: &JoinToken, n: usize) -> RegisterRequest {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let public = boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(secret));
    RegisterRequest {
        token_secret: token.secret_text(),
        public_key: crate::coord::keys::encode_key(public.as_bytes()),
        hostname: format!("loadgen-{n}"),
        os: "loadgen".into(),
        ipv6_supported: true,
        ..Default::default()
    }
}

fn endpoint_of(n: usize, port: u16) -> SocketAddr {
    let host = u8::try_from(n % 250 + 1).unwrap_or(1);
    SocketAddr::new(Ipv4Addr::new(192, 0, 2, host).into(), port)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return false;
    };
    // Compare only where the first byte matches.
    haystack
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == first)
        .any(|(i, _)| haystack.get(i + 1..i + needle.len()) == Some(rest))
}

/// Reads one frame (length prefix and body) into `buf`; what went wrong if the
/// stream ended or failed before the whole frame arrived.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    let len = frame::parse_length(prefix, MAX_RESPONSE_LEN).map_err(|e| format!("watch: {e}"))?;
    buf.resize(len, 0);
    recv.read_exact(buf)
        .await
        .map_err(|e| format!("watch: {e} ({len}-byte frame cut short)"))?;
    Ok(())
}

/// Where a watch stream's first frame is reported: `Ok` when it was a snapshot, else
/// what went wrong (the stream failed or ended before the whole frame, or the
/// coordinator answered with an error). Without one, a failure is recorded in
/// [`Probe::errors`].
type FirstFrame = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Reads a watch stream's frames (raw: only the probe's marker is looked for, and,
/// into `view`, the database a [`Response::Watching`] names and the revision of every
/// snapshot and delta). The first frame after [`Response::Watching`] (a snapshot, or
/// the delta of a resumed watch) is what counts as "its snapshot".
async fn watch_loop<R: tokio::io::AsyncRead + Unpin>(
    mut recv: R,
    probe: Arc<Probe>,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
    mut first_frame: Option<FirstFrame>,
    view: Option<View>,
    count_snapshot: bool,
) {
    let mut buf = Vec::new();
    let mut first = true;
    // A storm's stream (the one that reports its first frame on a channel).
    let storm = first_frame.is_some();
    let mut last_probe = 0u64;
    let mut database = 0;
    let fail = |first_frame: Option<FirstFrame>, e: String| match first_frame {
        Some(tx) => {
            let _ = tx.send(Err(e));
        }
        None => probe
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e),
    };
    loop {
        if let Err(e) = read_frame(&mut recv, &mut buf).await {
            // Before the first frame was whole, this node has no snapshot: it must
            // be reported (and, in the storm, reconnect), never forgotten.
            if first {
                fail(first_frame.take(), e);
            } else if storm {
                // After it, the node misses every later change unless it reconnects:
                // counted too.
                tracing::debug!(error = %e, "a watch stream ended after its snapshot");
                probe.lost.lock().unwrap_or_else(|e| e.into_inner()).push(e);
            }
            return;
        }
        let now = Instant::now();
        *probe.last_frame.lock().unwrap_or_else(|e| e.into_inner()) = now;
        if let Some(view) = &view {
            if let Some(revision) = peers::revision_of(&buf) {
                // The database and the revision change together: a revision is never
                // kept with another database's id.
                let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                v.database = database;
                v.revision = revision;
            } else if buf
                .get(1..)
                .is_some_and(|b| b.starts_with(b"{\"type\":\"watching\""))
            {
                if let Ok(Response::Watching { database: d, .. }) = frame::decode_payload(&buf) {
                    database = d;
                }
                continue;
            }
        }
        if first {
            first = false;
            permit.take();
            // A JSON message first (the version byte, then its type) is an error: a
            // snapshot comes in the binary form.
            if buf
                .get(1..)
                .is_some_and(|b| b.starts_with(b"{\"type\":\"error\""))
            {
                fail(
                    first_frame.take(),
                    String::from_utf8_lossy(&buf).into_owned(),
                );
                return;
            }
            if count_snapshot {
                probe
                    .snapshot_times
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(now);
                probe.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(tx) = first_frame.take() {
                let _ = tx.send(Ok(()));
            }
        }
        if probe.active.load(Ordering::Acquire) {
            let seq = probe.seq.load(Ordering::Acquire);
            if seq != last_probe {
                let marker = probe
                    .marker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if contains(&buf, &marker) {
                    last_probe = seq;
                    let started = *probe.started.lock().unwrap_or_else(|e| e.into_inner());
                    probe
                        .seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(now.duration_since(started));
                    probe.seen_count.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        // Deltas are small: keep no snapshot-sized buffer per watcher.
        if buf.capacity() > 64 * 1024 {
            buf = Vec::new();
        }
    }
}

impl Probe {
    /// Waits (at most `limit`) until no frame has arrived for a second: the deltas
    /// in flight have drained. Returns the seconds it took, the quiet second aside.
    async fn settle(&self, limit: Duration) -> f64 {
        let settle = Instant::now();
        let quiet = Duration::from_secs(1);
        wait_until(limit, || {
            self.last_frame
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                > quiet
        })
        .await;
        settle.elapsed().as_secs_f64() - quiet.as_secs_f64()
    }
}

/// Waits until `done` or `limit` passes; false on timeout.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

pub async fn run(args: LoadgenArgs) -> Result<Report, LoadgenError> {
    let token = JoinToken::parse(args.token.as_deref().unwrap_or_default())?;
    let n = args.nodes.max(1);
    let mut endpoints = Vec::new();
    let runtime = quinn::default_runtime()
        .ok_or_else(|| LoadgenError::Bind(std::io::Error::other("no async runtime")))?;
    for _ in 0..args.sockets.max(1) {
        let socket = crate::serve::udp_socket((Ipv4Addr::UNSPECIFIED, 0).into())
            .map_err(LoadgenError::Bind)?;
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            runtime.clone(),
        )
        .map_err(LoadgenError::Bind)?;
        ep.set_default_client_config(identity::client_config(token.fingerprint)?);
        endpoints.push(ep);
    }
    let rss = |pids: &[u32]| pids.iter().map(|&p| rss_kib(p)).sum::<u64>();
    let rss_before = rss(&args.coordinator_pid);
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));

    // 1. Register.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let ep = endpoints[i % endpoints.len()].clone();
        let addr = args.coordinator[i % args.coordinator.len()];
        let req = Request::Register(register_request(&token, i));
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            // A node retries like `nexodus join` would (a lost handshake, a refusal
            // while the database reconnects); every failed attempt is counted.
            let mut failures = Vec::new();
            for _ in 0..3 {
                match register_node(&ep, addr, &req).await {
                    Ok(node) => return Ok((node, failures)),
                    Err(e) => failures.push(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(failures.join("; "))
        }));
    }
    let mut nodes = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok((node, failures))) => {
                nodes.push(Arc::new(node));
                errors.extend(failures);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if nodes.is_empty() {
        return Err(LoadgenError::Node {
            node: 0,
            what: format!("no node registered: {errors:?}"),
        });
    }
    let registrations_per_sec = nodes.len() as f64 / started.elapsed().as_secs_f64();
    let n = nodes.len();
    tracing::info!(registrations_per_sec, "registered");

    // 2. Update endpoints.
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let update = DeviceUpdate {
                endpoints: Some(vec![endpoint_of(i, 51820)]),
                ..Default::default()
            };
            call(
                &node.conn(),
                &Request::Update {
                    auth: node.auth.clone(),
                    update,
                },
            )
            .await
            .map(|_| ())
        }));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let updates_per_sec = n as f64 / started.elapsed().as_secs_f64();
    tracing::info!(updates_per_sec, "endpoints updated");

    // Without first watches, the nodes are taken to be current where one watch
    // finds the organization now (as if each had watched), so that they resume.
    if args.storm_only
        && !args.no_resume
        && let Some(first) = nodes.first()
    {
        let (database, revision) = observe(first)
            .await
            .map_err(|what| LoadgenError::Node { node: 0, what })?;
        for node in &nodes {
            let mut v = node.view.lock().unwrap_or_else(|e| e.into_inner());
            v.database = database;
            v.revision = revision;
        }
        tracing::info!(database, revision, "nodes will resume from this revision");
    }

    // 3. Watch.
    let probe = Arc::new(Probe::new());
    let started = Instant::now();
    let mut streams = Vec::with_capacity(n);
    let watchers = if args.storm_only { 0 } else { n };
    for node in nodes.iter().take(watchers) {
        // At most --concurrency snapshots on their way at once.
        let permit = sem.clone().acquire_owned().await.ok();
        let opened = async {
            let (mut send, recv) = node.conn().open_bi().await.map_err(|e| e.to_string())?;
            let req = Request::Watch {
                auth: node.auth.clone(),
                instance: None,
                resume: Some(*node.view.lock().unwrap_or_else(|e| e.into_inner())),
            };
            quicio::write_message(&mut send, &req, MAX_REQUEST_LEN)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((send, recv))
        };
        match opened.await {
            Ok((send, recv)) => {
                streams.push(send);
                let view = Some(node.view.clone());
                tokio::spawn(watch_loop(recv, probe.clone(), permit, None, view, true));
            }
            Err(e) => probe
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("watch: {e}")),
        }
    }
    let limit = Duration::from_secs(600);
    let failed = || probe.errors.lock().unwrap_or_else(|e| e.into_inner()).len();
    if !wait_until(limit, || {
        probe.snapshots.load(Ordering::Relaxed) + failed() >= watchers
    })
    .await
    {
        return Err(LoadgenError::Timeout(format!(
            "only {} of {n} watches got a snapshot within {limit:?}",
            probe.snapshots.load(Ordering::Relaxed)
        )));
    }
    errors.extend(
        probe
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..),
    );
    let watch_setup_secs = started.elapsed().as_secs_f64();
    tracing::info!(watch_setup_secs, "all nodes watching");
    let settle_secs = probe.settle(limit).await;
    let rss_after = rss(&args.coordinator_pid);

    // 4. Probes.
    let (per_watcher, all, missed) = if args.storm_only {
        (Vec::new(), Vec::new(), 0)
    } else {
        run_probes(&nodes, &probe, args.probes, 0).await?
    };

    // 5. The reconnect storm.
    let mut storm = None;
    if let Some(cmd) = &args.restart_cmd {
        let (report, new_nodes) =
            run_storm(&args, cmd, &endpoints, &nodes, &probe, &mut streams).await?;
        storm = Some(report);
        nodes = new_nodes;
    }
    for s in &mut streams {
        let _ = s.finish();
    }
    for node in &nodes {
        node.conn().close(0u32.into(), b"loadgen done");
    }
    for ep in &endpoints {
        ep.wait_idle().await;
    }
    Ok(Report {
        label: args.label,
        nodes: n,
        coordinators: args.coordinator.len(),
        registrations_per_sec,
        updates_per_sec,
        watch_setup_secs,
        settle_secs,
        probes: args.probes,
        watcher_p50_ms: percentile(&per_watcher, 0.5),
        watcher_p99_ms: percentile(&per_watcher, 0.99),
        all_p50_ms: percentile(&all, 0.5),
        all_p99_ms: percentile(&all, 0.99),
        all_max_ms: all.last().copied().unwrap_or(f64::NAN),
        missed,
        errors: errors.len(),
        first_error: errors.first().cloned(),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        storm,
        json: args.json,
    })
}

/// The frame bytes that carry `ep` ([`crate::wire::peers`]: type, address, port).
fn endpoint_marker(ep: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(19);
    match ep.ip() {
        std::net::IpAddr::V4(a) => {
            m.push(4);
            m.extend_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            m.push(6);
            m.extend_from_slice(&a.octets());
        }
    }
    m.extend_from_slice(&ep.port().to_be_bytes());
    m
}

/// Phase 4: per watcher latencies (ms), per probe time to all (ms), watchers missed.
async fn run_probes(
    nodes: &[Arc<Node>],
    probe: &Arc<Probe>,
    probes: usize,
    round: usize,
) -> Result<(Vec<f64>, Vec<f64>, usize), LoadgenError> {
    let n = nodes.len();
    let mut per_watcher: Vec<f64> = Vec::new();
    let mut all: Vec<f64> = Vec::new();
    let mut missed = 0;
    for k in 0..probes {
        let i = (k * 7919) % n;
        let node = &nodes[i];
        // Another port each round: a change to what the node already has is no change.
        let port = 40_000 + u16::try_from((round * 1000 + k) % 20_000).unwrap_or(0);
        let ep = endpoint_of(i, port);
        *probe.marker.lock().unwrap_or_else(|e| e.into_inner()) = endpoint_marker(ep);
        probe.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
        probe.seen_count.store(0, Ordering::Release);
        probe.seq.store(k as u64 + 1, Ordering::Release);
        let t0 = Instant::now();
        *probe.started.lock().unwrap_or_else(|e| e.into_inner()) = t0;
        probe.active.store(true, Ordering::Release);
        call(
            &node.conn(),
            &Request::Update {
                auth: node.auth.clone(),
                update: DeviceUpdate {
                    endpoints: Some(vec![ep]),
                    ..Default::default()
                },
            },
        )
        .await
        .map_err(|what| LoadgenError::Node { node: i, what })?;
        let everyone = wait_until(Duration::from_secs(10), || {
            probe.seen_count.load(Ordering::Acquire) >= n
        })
        .await;
        probe.active.store(false, Ordering::Release);
        let seen = std::mem::take(&mut *probe.seen.lock().unwrap_or_else(|e| e.into_inner()));
        missed += n.saturating_sub(seen.len());
        let ms: Vec<f64> = seen.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        if everyone {
            all.push(ms.iter().copied().fold(0.0, f64::max));
        }
        per_watcher.extend(ms);
        // Let stragglers' frames of this probe pass before the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    per_watcher.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    Ok((per_watcher, all, missed))
}

/// Opens one watch stream naming no revision: the database it names and the revision
/// of the snapshot that follows.
async fn observe(node: &Node) -> Result<(i64, i64), String> {
    let (mut send, mut recv) = node.conn().open_bi().await.map_err(|e| e.to_string())?;
    let mut from = *node.view.lock().unwrap_or_else(|e| e.into_inner());
    from.database = 0;
    let req = Request::Watch {
        auth: node.auth.clone(),
        instance: None,
        resume: Some(from),
    };
    quicio::write_message(&mut send, &req, MAX_REQUEST_LEN)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    read_frame(&mut recv, &mut buf).await?;
    let database = match frame::decode_payload(&buf) {
        Ok(Response::Watching { database, .. }) => database,
        other => return Err(format!("watch: unexpected first answer {other:?}")),
    };
    read_frame(&mut recv, &mut buf).await?;
    let revision = peers::revision_of(&buf).ok_or("watch: no snapshot")?;
    let _ = send.finish();
    recv.stop(0u32.into()).ok();
    Ok((database, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// What a watch stream carrying `bytes` (then its end) reports for its first frame.
    async fn first_frame_of(bytes: Vec<u8>) -> (Result<(), String>, Arc<Probe>) {
        let probe = Arc::new(Probe::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        watch_loop(&bytes[..], probe.clone(), None, Some(tx), None, true).await;
        let outcome = rx
            .await
            .expect("the first frame's outcome is always reported");
        (outcome, probe)
    }

    /// The storm stalled because a snapshot cut short (the connection lost while its
    /// body arrived) was neither counted nor reported: the node never reconnected
    /// and the run waited for it forever. Every way a first frame can fail is now
    /// reported, and only a whole snapshot counts.
    #[tokio::test]
    async fn a_snapshot_cut_short_is_reported_not_forgotten() {
        let snapshot = framed(&[1u8; 100]);
        let (ok, probe) = first_frame_of(snapshot.clone()).await;
        assert_eq!(ok, Ok(()));
        assert_eq!(probe.snapshots.load(Ordering::Relaxed), 1);

        // Its body cut short: the case that used to vanish.
        let (cut, probe) = first_frame_of(snapshot[..40].to_vec()).await;
        assert!(cut.unwrap_err().contains("cut short"));
        assert_eq!(probe.snapshots.load(Ordering::Relaxed), 0);
        // Its length cut short, nothing at all, a zero length, an error answer.
        for bytes in [
            snapshot[..2].to_vec(),
            Vec::new(),
            vec![0, 0, 0, 0],
            framed(b"\x01{\"type\":\"error\",\"code\":\"conflict\"}"),
        ] {
            let (failed, probe) = first_frame_of(bytes).await;
            assert!(failed.is_err());
            assert_eq!(probe.snapshots.load(Ordering::Relaxed), 0);
        }
    }

    /// After a storm's resumed watchers were current, a few missed every probe: their
    /// streams had ended after the first frame (the connection lost under load) and
    /// nothing noticed, so the node never reconnected as `nexodus join` does. Such
    /// an end is now recorded (and the storm's node task reconnects on it).
    #[tokio::test]
    async fn a_storm_stream_lost_after_its_snapshot_is_recorded() {
        let snapshot = framed(&[1u8; 100]);
        let mut bytes = snapshot.clone();
        bytes.extend_from_slice(&snapshot[..10]);
        let (ok, probe) = first_frame_of(bytes).await;
        assert_eq!(ok, Ok(()));
        assert_eq!(probe.lost.lock().unwrap().len(), 1);
        // Not a storm stream (no channel): not counted as lost.
        let probe = Arc::new(Probe::new());
        watch_loop(&snapshot[..], probe.clone(), None, None, None, true).await;
        assert!(probe.lost.lock().unwrap().is_empty());
        // A reconnect's stream: its snapshot is not the storm's figure again.
        let probe = Arc::new(Probe::new());
        let (tx, _rx) = tokio::sync::oneshot::channel();
        watch_loop(&snapshot[..], probe.clone(), None, Some(tx), None, false).await;
        assert_eq!(probe.snapshots.load(Ordering::Relaxed), 0);
    }

    /// Without a channel for the outcome (the first watch phase), a failed first
    /// frame is recorded as an error, so the phase's wait counts it.
    #[tokio::test]
    async fn without_a_channel_the_failure_is_recorded() {
        let probe = Arc::new(Probe::new());
        let bytes = framed(&[1u8; 100]);
        watch_loop(&bytes[..50], probe.clone(), None, None, None, true).await;
        assert_eq!(probe.errors.lock().unwrap().len(), 1);
        assert_eq!(probe.snapshots.load(Ordering::Relaxed), 0);
    }
}
