//! `--metrics-listen ADDR`: a plain-HTTP `/metrics` endpoint in the Prometheus text
//! format, for `serve` and `join`.
//!
//! The caller gives a function that renders the current figures; this module only
//! serves what it returns. It keeps no counters of its own and never touches the data
//! path: a scrape reads figures the coordinator or node already keeps. Anything but
//! `GET /metrics` is answered 404 (405 for another method on `/metrics`).

use std::future::Future;
use std::net::SocketAddr;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;

/// The Prometheus text exposition format, version 0.0.4 (what `promtool check
/// metrics` and every Prometheus server read).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes every family of `registry` in the text format.
pub fn encode(registry: &prometheus::Registry) -> Result<String, prometheus::Error> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr` (before returning, so a taken port is an error at start).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })
}

/// Serves `GET /metrics` with what `render` returns, until the listener fails.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], render().await) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
