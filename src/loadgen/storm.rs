//! The reconnect storm (`--restart-cmd`): the coordinators restarted, every node
//! reconnecting at once with jittered backoff and resuming from the revision it had.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    LoadgenArgs, LoadgenError, Node, Probe, StormReport, View, call, percentile, rss_kib,
    run_probes, watch_loop,
};
use crate::quicio;
use crate::wire::control::{Auth, Request, SERVER_NAME};
use crate::wire::frame::MAX_REQUEST_LEN;

/// One node reconnecting as `nexodus join` does: a new connection, login, watch.
async fn reconnect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    auth: &Auth,
    instance: u64,
    view: Option<&View>,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    let conn = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let login = Request::Login {
        auth: auth.clone(),
        ipv6_supported: Some(true),
        instance: Some(instance),
    };
    call(&conn, &login)
        .await
        .map_err(|e| format!("login: {e}"))?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = Request::Watch {
        auth: auth.clone(),
        instance: Some(instance),
        resume: view.map(|v| *v.lock().unwrap_or_else(|e| e.into_inner())),
    };
    quicio::write_message(&mut send, &req, MAX_REQUEST_LEN)
        .await
        .map_err(|e| format!("watch: {e}"))?;
    Ok((conn, send, recv))
}

/// How long the storm's nodes keep reconnecting until each has its snapshot.
const STORM_LIMIT: Duration = Duration::from_secs(600);

/// Phase 5: restarts the coordinator(s) and times every node reconnecting at once.
pub(super) async fn run_storm(
    args: &LoadgenArgs,
    cmd: &str,
    endpoints: &[quinn::Endpoint],
    nodes: &[Arc<Node>],
    probe: &Arc<Probe>,
    streams: &mut Vec<quinn::SendStream>,
) -> Result<(StormReport, Vec<Arc<Node>>), LoadgenError> {
    let n = nodes.len();
    probe.snapshots.store(0, Ordering::Relaxed);
    probe
        .snapshot_times
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let started = Instant::now();
    tracing::info!(cmd, "restarting the coordinator(s)");
    let out = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| LoadgenError::Timeout(format!("restart command: {e}")))?
        .wait_with_output()
        .await
        .map_err(|e| LoadgenError::Timeout(format!("restart command: {e}")))?;
    if !out.status.success() {
        return Err(LoadgenError::Timeout(format!(
            "restart command failed: {}",
            out.status
        )));
    }
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|p| p.parse().ok())
        .collect();
    // The old streams are dead: the coordinator closed every connection.
    streams.clear();
    let retries = Arc::new(Mutex::new(Vec::<String>::new()));
    // Every node keeps trying until it has its snapshot or this passes.
    let deadline = started + STORM_LIMIT;
    let mut tasks = Vec::with_capacity(n);
    let mut ready = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let ep = endpoints[i % endpoints.len()].clone();
        let addr = args.coordinator[i % args.coordinator.len()];
        // The node as the probes will use it: its connection is replaced whenever it
        // reconnects.
        let node = Arc::new(Node {
            conn: Mutex::new(node.conn()),
            auth: node.auth.clone(),
            view: node.view.clone(),
        });
        let (probe, retries) = (probe.clone(), retries.clone());
        let instance: u64 = rand::random();
        let resume = !args.no_resume;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        tasks.push(tokio::spawn(async move {
            // As `nexodus join`: a jittered first attempt, then a jittered doubling
            // backoff; and as it does, a node whose watch stream fails (before its
            // snapshot arrived: the connection lost, the stream reset; or later: the
            // connection lost under load) reconnects. Only the first snapshot is
            // the storm's figure; a node that lost its stream after it and did not
            // reconnect would miss every probe that follows.
            let mut ready_tx = Some((ready_tx, node.clone()));
            let mut backoff = Duration::from_millis(250);
            tokio::time::sleep(Duration::from_millis(
                u64::from(rand::random::<u16>()) % 500,
            ))
            .await;
            while Instant::now() < deadline {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(30),
                    reconnect(
                        &ep,
                        addr,
                        &node.auth,
                        instance,
                        resume.then_some(&node.view),
                    ),
                )
                .await
                .unwrap_or_else(|_| Err("reconnect: no answer within 30 s".into()));
                let failure = match attempt {
                    Ok((conn, send, recv)) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let view = Some(node.view.clone());
                        let counted = ready_tx.is_some();
                        let stream = tokio::spawn(watch_loop(
                            recv,
                            probe.clone(),
                            None,
                            Some(tx),
                            view,
                            counted,
                        ));
                        // Bounded: a stream that never brings its snapshot (nor fails)
                        // must not hang the run.
                        let until = tokio::time::Instant::from_std(deadline);
                        match tokio::time::timeout_at(until, rx)
                            .await
                            .unwrap_or_else(|_| Ok(Err("no snapshot by the deadline".into())))
                        {
                            Ok(Ok(())) => {
                                *node.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
                                if let Some((tx, node)) = ready_tx.take() {
                                    let _ = tx.send(node);
                                }
                                backoff = Duration::from_millis(250);
                                // Held until it ends (the run aborts this task).
                                let _ = stream.await;
                                drop(send);
                                "watch stream lost after the snapshot".into()
                            }
                            Ok(Err(e)) => format!("before the snapshot: {e}"),
                            Err(_) => "watch stream dropped before the snapshot".into(),
                        }
                    }
                    Err(e) => e,
                };
                retries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(failure);
                let jitter = 0.5 + f64::from(rand::random::<u16>()) / f64::from(u16::MAX) / 2.0;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(4));
            }
        }));
    }
    let mut new_nodes = Vec::with_capacity(n);
    let progress = {
        let (probe, retries) = (probe.clone(), retries.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                tracing::info!(
                    secs = started.elapsed().as_secs(),
                    snapshots = probe.snapshots.load(Ordering::Relaxed),
                    retries = retries.lock().unwrap_or_else(|e| e.into_inner()).len(),
                    "storm under way"
                );
            }
        })
    };
    for r in ready {
        // A node's task reports once its snapshot arrived; at the deadline without
        // one, it ends and drops its sender.
        if let Ok(node) = r.await {
            new_nodes.push(node);
        }
    }
    let complete = new_nodes.len() == n;
    let limit = STORM_LIMIT;
    let times: Vec<f64> = {
        let t = probe
            .snapshot_times
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<f64> = t
            .iter()
            .map(|at| at.duration_since(started).as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let all_snapshots_secs = if complete {
        times.last().copied().unwrap_or(f64::NAN)
    } else {
        f64::NAN
    };
    progress.abort();
    tracing::info!(all_snapshots_secs, "storm: every node has its snapshot");
    let settle_secs = probe.settle(limit).await;
    let rss_after_kib = pids.iter().map(|&p| rss_kib(p)).sum();
    let lost = n - times.len().min(n);
    let (per_watcher, all, missed) = run_probes(&new_nodes, probe, args.probes, 1).await?;
    let losses = std::mem::take(&mut *probe.lost.lock().unwrap_or_else(|e| e.into_inner()));
    for t in &tasks {
        t.abort();
    }
    let retries = std::mem::take(&mut *retries.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((
        StormReport {
            all_snapshots_secs,
            snapshot_p50_secs: percentile(&times, 0.5),
            snapshot_p99_secs: percentile(&times, 0.99),
            settle_secs,
            lost,
            retries: retries.len(),
            first_error: retries.first().cloned(),
            watcher_p50_ms: percentile(&per_watcher, 0.5),
            watcher_p99_ms: percentile(&per_watcher, 0.99),
            all_p50_ms: percentile(&all, 0.5),
            all_p99_ms: percentile(&all, 0.99),
            missed,
            streams_lost: losses.len(),
            first_loss: losses.first().cloned(),
            rss_after_kib,
        },
        new_nodes,
    ))
}
