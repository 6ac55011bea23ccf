//! The node's local sockets: `nexodus status` and the WireGuard UAPI (`wg show`).
//!
//! Each connection is answered from the driver's latest published [`NodeView`]
//! (a `watch` channel: no lock shared with the driver) and a fresh data-path status.
//! What the answers look like is `status`'s and `uapi`'s business.

use std::future::Future;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::node::agent::NodeView;

use super::datapath::{DataPath, DataPathStatus};
use super::{JoinConfig, JoinError, status, uapi};

/// The running socket tasks.
pub(super) struct Sockets {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    uapi_bound: bool,
}

impl Sockets {
    /// Binds the status socket and (not in rootless mode, and unless another
    /// process serves it) the UAPI socket, and answers them from `view`.
    pub(super) async fn start(
        cfg: &JoinConfig,
        datapath: &Arc<DataPath>,
        view: watch::Receiver<NodeView>,
        stack: Option<Arc<crate::userspace::Stack>>,
        listen_port: u16,
        private: [u8; 32],
    ) -> Result<Self, JoinError> {
        let listener = status::bind(&cfg.state_dir).map_err(JoinError::StatusSocket)?;
        let uapi_listener = match uapi::bind(&cfg.interface).await {
            _ if stack.is_some() => None,
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "no WireGuard UAPI socket; `wg show` will not see this node");
                None
            }
        };
        let metrics_stack = stack.clone();
        let advertised = cfg.advertise_cidrs.clone();
        let metrics_advertised = advertised.clone();
        let mut tasks = vec![tokio::spawn(serve(
            listener,
            datapath.clone(),
            view.clone(),
            "status",
            move |v, dp| status::build(v, dp, listen_port, stack.as_deref(), advertised.clone()),
            |stream, report| async move { status::answer(stream, &report).await },
        ))];
        if let Some(addr) = cfg.metrics_listen {
            let listener = crate::metrics::bind(addr).await?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            let (datapath, view, stack) = (datapath.clone(), view.clone(), metrics_stack);
            tasks.push(tokio::spawn(crate::metrics::serve(listener, move || {
                let (datapath, view, stack) = (datapath.clone(), view.clone(), stack.clone());
                let advertised = metrics_advertised.clone();
                async move {
                    let dp = datapath.status().await;
                    let report = status::build(
                        &view.borrow(),
                        dp.as_ref(),
                        listen_port,
                        stack.as_deref(),
                        advertised,
                    );
                    super::metrics::render(&report)
                }
            })));
        }
        let uapi_bound = uapi_listener.is_some();
        if let Some(l) = uapi_listener {
            let keepalive = cfg.keepalive;
            tasks.push(tokio::spawn(serve(
                l,
                datapath.clone(),
                view,
                "uapi",
                move |v, dp| {
                    let peers = uapi::peers(v, dp, keepalive);
                    uapi::render_get(&private, listen_port, &peers, std::time::SystemTime::now())
                },
                |stream, answer| uapi::serve_one(stream, move || answer),
            )));
        }
        Ok(Self { tasks, uapi_bound })
    }

    /// Stops answering and removes the socket files.
    pub(super) async fn stop(self, cfg: &JoinConfig) {
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let _ = std::fs::remove_file(status::socket_path(&cfg.state_dir));
        if self.uapi_bound {
            let _ = std::fs::remove_file(uapi::socket_path(&cfg.interface));
        }
    }
}

/// Answers every connection on `listener`: `render` builds the answer from the
/// view and the data path's status, `reply` sends it. `what` names the socket in logs.
async fn serve<R, Fut>(
    listener: UnixListener,
    datapath: Arc<DataPath>,
    view: watch::Receiver<NodeView>,
    what: &'static str,
    render: impl Fn(&NodeView, Option<&DataPathStatus>) -> R,
    reply: impl Fn(UnixStream, R) -> Fut,
) where
    Fut: Future<Output = std::io::Result<()>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let dp = datapath.status().await;
        let answer = render(&view.borrow(), dp.as_ref());
        if let Err(e) = reply(stream, answer).await {
            tracing::debug!(error = %e, socket = what, "local client went away");
        }
    }
}
