//! The HTTP side port, as Triton's: Prometheus metrics and the KServe v2 health endpoints, for scrapers and
//! probes that do not speak gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub models: Arc<Registry>,
    /// Set once shutdown has begun: readiness turns false before the server stops.
    pub draining: Arc<AtomicBool>,
}

/// `/metrics`, `/v2/health/live`, `/v2/health/ready`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Live while the process answers at all.
async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready when every model is loaded and warmed up and shutdown has not begun: the same rule as gRPC health.
async fn ready(State(state): State<HttpState>) -> StatusCode {
    if state.models.all_ready() && !state.draining.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
