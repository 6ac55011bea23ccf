//! One watch stream: the snapshot, then every delta of the organization, with
//! writes that time out when they stall; a device's watch marks it online, and a
//! second process with the device's credential is refused while the first is
//! connected.

use std::net::SocketAddr;

use bytes::Bytes;

use super::*;
/// Writes a snapshot taken from the hub; returns its revision. A write that stalls
/// for [`WRITE_TIMEOUT`] fails.
async fn send_snapshot(
    send: &mut quinn::SendStream,
    snapshot: hub::Snapshot,
) -> Result<i64, FrameIoError> {
    write_timed(send, snapshot.frame?).await?;
    Ok(snapshot.revision)
}

/// Unacknowledged bytes a connection may have while its snapshot is written under an
/// admission permit ([`Hub::snapshot_permit`]). QUIC takes a write as done once the
/// bytes are buffered, and a connection buffers [`crate::identity::SERVER_SEND_WINDOW`]
/// (more than a 10,000-device snapshot): with that window a permit was released
/// before the snapshot had left, admission bounded nothing, and in a reconnect storm
/// thousands of snapshots went out at once, each too slowly to arrive before its
/// connection timed out or a delta behind it stalled past [`WRITE_TIMEOUT`]. With
/// this window the permit is held until all but this much of the snapshot was
/// acknowledged: admission bounds the bytes in flight.
pub(super) const SNAPSHOT_SEND_WINDOW: u64 = 128 << 10;

/// Narrows a connection's send window to [`SNAPSHOT_SEND_WINDOW`] until dropped.
struct NarrowWindow<'a>(&'a quinn::Connection);

impl<'a> NarrowWindow<'a> {
    fn new(conn: &'a quinn::Connection) -> Self {
        conn.set_send_window(SNAPSHOT_SEND_WINDOW);
        Self(conn)
    }
}

impl Drop for NarrowWindow<'_> {
    fn drop(&mut self) {
        self.0.set_send_window(crate::identity::SERVER_SEND_WINDOW);
    }
}

/// [`send_snapshot`] for a caller that holds an admission permit: returns once all
/// but [`SNAPSHOT_SEND_WINDOW`] bytes of it were acknowledged.
async fn send_admitted(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    snapshot: hub::Snapshot,
) -> Result<i64, FrameIoError> {
    let _narrow = NarrowWindow::new(conn);
    send_snapshot(send, snapshot).await
}

/// Takes a new snapshot of the device's organization (a watcher that fell behind) and
/// writes it, under an admission permit ([`Hub::snapshot_permit`]).
async fn resend_snapshot(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    hub: &Hub,
    organization_id: i64,
    stun_port: Option<u16>,
) -> Result<i64, FrameIoError> {
    let _permit = hub.snapshot_permit().await;
    send_admitted(conn, send, hub.snapshot(organization_id, stun_port)).await
}

/// Writes shared bytes without copying them, failed when the peer takes none of them
/// for [`WRITE_TIMEOUT`] (it does not read; a slow link still makes progress): the
/// stream is reset and whatever it held is freed.
async fn write_timed(send: &mut quinn::SendStream, bytes: Bytes) -> Result<(), FrameIoError> {
    let mut rest = [bytes];
    while !rest[0].is_empty() {
        match tokio::time::timeout(WRITE_TIMEOUT, send.write_chunks(&mut rest)).await {
            Ok(written) => {
                written?;
            }
            Err(_) => {
                let _ = send.reset(3u32.into());
                return Err(FrameIoError::Write(quinn::WriteError::Stopped(3u32.into())));
            }
        }
    }
    Ok(())
}

/// The answer to a second node process with a device's credential while another one
/// is connected (a cloned state directory): it names the first.
pub(super) fn clone_refusal(id: i64, first: SocketAddr, remote: SocketAddr) -> Response {
    store_clone_refusal(
        &StoreError::Connected {
            id,
            from: first.to_string(),
        },
        remote,
    )
}

/// [`clone_refusal`] for the store's word (the first is on another replica).
fn store_clone_refusal(e: &StoreError, remote: SocketAddr) -> Response {
    tracing::warn!(%remote, error = %e, "refused a second node with this device's credential");
    handler::error_response(e)
}

pub(super) async fn serve_watch(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    shell: &Shell,
    remote: SocketAddr,
    auth: Auth,
    instance: Option<u64>,
    resume: Option<ResumeFrom>,
) -> Result<(), FrameIoError> {
    let (store, hub, stun_port) = (&shell.store, &shell.hub, shell.stun_port);
    let me = match with_store(store, move |s| handler::authenticate(s, &auth)).await {
        Ok(d) => d,
        Err(e) => {
            log_refusal(remote, &e);
            quicio::write_message(&mut send, &handler::error_response(&e), MAX_RESPONSE_LEN)
                .await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    shell.authenticated();
    let id = me.id;
    // One watch stream per device: this one replaces any older one of the same node
    // process (which ends); another process's is refused.
    let slot = match hub.watch_started(id, instance, remote) {
        Ok(slot) => slot,
        Err(first) => {
            let resp = clone_refusal(id, first, remote);
            quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    // The same across replicas (the store knows the others' streams).
    match super::presence::claim_watch(&shell.presences, id, instance, remote).await {
        Ok(()) => {}
        Err(e @ StoreError::Connected { .. }) => {
            hub.watch_ended(&slot);
            let resp = store_clone_refusal(&e, remote);
            quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
            let _ = send.finish();
            return Ok(());
        }
        Err(e) => tracing::warn!(id, error = %e, "could not record the watch"),
    }
    let watch = async {
        // The snapshot includes the device's own latest change (a node that just
        // registered finds itself), and is taken with the subscription: nothing
        // falls in between.
        // A node resuming from a revision of this database this replica has not
        // applied yet (it was connected to a faster one) waits for it too.
        let wanted = match &resume {
            Some(r) if r.database == hub.database() => me.revision.max(r.revision),
            _ => me.revision,
        };
        if !hub.caught_up(wanted, CATCH_UP).await {
            tracing::warn!(id, "change log behind; the snapshot may lag");
        }
        // A node that names where it stands is brought current with a delta when
        // the views can (no admission: a delta is small); else a snapshot.
        if resume.is_some() {
            let database = hub.database();
            match hub.subscribe_resumed(me.organization_id, resume.as_ref()) {
                Ok(r) => {
                    let hello = Response::Watching {
                        database,
                        resumed: Some(r.revision),
                        stun_port,
                    };
                    quicio::write_message(&mut send, &hello, MAX_RESPONSE_LEN).await?;
                    write_timed(&mut send, r.frame?).await?;
                    hub.metrics.resumed();
                    tracing::info!(
                        id,
                        hostname = %me.hostname,
                        %remote,
                        revision = r.revision,
                        resumed_from = r.from,
                        "watch started"
                    );
                    set_online_batched(shell, id, true).await;
                    let mut rx = r.rx;
                    return forward_deltas(
                        conn, &mut send, hub, &mut rx, &me, r.revision, stun_port,
                    )
                    .await;
                }
                Err(why) => {
                    tracing::debug!(id, why = why.as_str(), "watcher gets a snapshot");
                    let hello = Response::Watching {
                        database,
                        resumed: None,
                        stun_port,
                    };
                    quicio::write_message(&mut send, &hello, MAX_RESPONSE_LEN).await?;
                }
            }
        }
        // Admission: a few snapshots on their way at once. The subscription and the
        // snapshot are taken once this watcher's turn has come, so it starts from
        // what is current then.
        let (mut rx, revision) = {
            // A node that went away while it waited (its connection timed out; it
            // reconnects and queues again) leaves the queue.
            let gone = send.stopped();
            let _permit = tokio::select! {
                p = hub.snapshot_permit() => p,
                _ = gone => return Ok(()),
            };
            let (rx, snapshot) = hub.subscribe_with_snapshot(me.organization_id, stun_port);
            (rx, send_admitted(conn, &mut send, snapshot).await?)
        };
        tracing::info!(id, hostname = %me.hostname, %remote, revision, "watch started");
        // Even if not its only stream: an older one may have been replaced before
        // it recorded the device online (recording it twice changes nothing).
        set_online_batched(shell, id, true).await;
        forward_deltas(conn, &mut send, hub, &mut rx, &me, revision, stun_port).await
    };
    let result = tokio::select! {
        r = watch => r,
        () = slot.replaced.notified() => {
            tracing::info!(id, %remote, "a newer watch stream of this device replaces this one");
            let _ = send.reset(4u32.into());
            Ok(())
        }
    };
    if hub.watch_ended(&slot) {
        set_online_batched(shell, id, false).await;
    }
    tracing::info!(id, %remote, "watch ended");
    result
}

/// [`set_online`] through the batching writer ([`super::presence`]).
async fn set_online_batched(shell: &Shell, id: i64, online: bool) {
    if let Err(e) = super::presence::set_online(&shell.presences, id, online).await {
        tracing::warn!(id, error = %e, "could not record online state");
    }
}

pub(super) async fn set_online(store: &SharedStore, hub: &Hub, id: i64, online: bool) {
    let now = unix_now();
    match with_store(store, move |s| s.set_online(id, online, now)).await {
        Ok(()) => hub.poke(),
        Err(e) => tracing::warn!(id, error = %e, "could not record online state"),
    }
}

/// Sends every delta newer than `revision` until the stream or the device ends.
async fn forward_deltas(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    hub: &Hub,
    rx: &mut tokio::sync::broadcast::Receiver<Arc<hub::OrgDelta>>,
    me: &Device,
    mut revision: i64,
    stun_port: Option<u16>,
) -> Result<(), FrameIoError> {
    loop {
        let delta = tokio::select! {
            r = rx.recv() => r,
            _ = send.stopped() => return Ok(()),
        };
        match delta {
            Ok(delta) => {
                if delta.revision <= revision {
                    continue;
                }
                revision = delta.revision;
                if delta.resync {
                    revision =
                        resend_snapshot(conn, send, hub, me.organization_id, stun_port).await?;
                    continue;
                }
                write_timed(send, delta.frame.clone()).await?;
                hub.metrics.fanned_out(delta.created.elapsed());
                if delta.removed.contains(&me.id) {
                    tracing::info!(id = me.id, "device removed; ending its watch");
                    let _ = send.finish();
                    return Ok(());
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    id = me.id,
                    missed = n,
                    "watcher fell behind; resending snapshot"
                );
                revision = resend_snapshot(conn, send, hub, me.organization_id, stun_port).await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, client_config};
    use crate::wire::control::SERVER_NAME;

    /// A coordinator-configured connection and its client end, on loopback.
    async fn pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
        let id = Identity::generate().unwrap();
        let server =
            quinn::Endpoint::server(id.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config(id.fingerprint()).unwrap());
        let connecting = client
            .connect(server.local_addr().unwrap(), SERVER_NAME)
            .unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        (client, c.unwrap(), s.unwrap())
    }

    /// Admission held a permit only while a snapshot was buffered into QUIC (a 4 MiB
    /// send window takes a whole snapshot at once), so it bounded nothing. Written
    /// under admission, the write returns only once all but
    /// [`SNAPSHOT_SEND_WINDOW`] bytes were acknowledged: the peer has them (though it
    /// has not read a byte).
    #[tokio::test]
    async fn an_admitted_snapshot_is_written_until_acknowledged() {
        let (_client, client, server) = pair().await;
        let (mut csend, _crecv) = client.open_bi().await.unwrap();
        csend.write_all(b"w").await.unwrap();
        let (mut ssend, _srecv) = server.accept_bi().await.unwrap();
        let len = 1 << 20;
        let before = client.stats().udp_rx.bytes;
        let snapshot = hub::Snapshot {
            revision: 7,
            frame: Ok(Bytes::from(vec![7u8; len])),
        };
        let revision = send_admitted(&server, &mut ssend, snapshot).await.unwrap();
        assert_eq!(revision, 7);
        let received = client.stats().udp_rx.bytes - before;
        assert!(
            received + SNAPSHOT_SEND_WINDOW >= len as u64,
            "only {received} of {len} bytes had arrived when the write returned"
        );
    }
}
