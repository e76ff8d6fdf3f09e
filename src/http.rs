//! The worker's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/sessions`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::browser::Pool;
use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct State {
    /// The worker's metrics.
    pub metrics: Metrics,
    /// The session pool, for gauges and `/sessions`.
    pub pool: Pool,
    /// True while connected to the broker and consuming.
    pub ready: Arc<AtomicBool>,
}

/// Serves until `stop` fires.
pub async fn serve(listener: tokio::net::TcpListener, state: State, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/sessions", get(sessions))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics server failed");
    }
}

async fn metrics(Extract(s): Extract<State>) -> impl IntoResponse {
    s.metrics.observe_pool(s.pool.status());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(Extract(s): Extract<State>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the broker\n",
        )
    }
}

async fn sessions(Extract(s): Extract<State>) -> impl IntoResponse {
    let status = s.pool.status();
    Json(serde_json::json!({
        "max_size": status.max_size,
        "size": status.size,
        "idle": status.available,
        "waiting": status.waiting,
        "sessions": s.pool.manager().sessions().list(),
    }))
}
