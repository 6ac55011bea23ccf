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

/// Answers every connection on `listener`: `render` builds the answer from the
/// view and the data path's status, `reply` sends it. `what` names the socket in logs.
pub(super) async fn serve<R, Fut>(
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
