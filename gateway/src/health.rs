//! Liveness, readiness and the Prometheus scrape: what orchestrators and monitoring ask the gateway.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ErrorBody;

/// The answer to `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process serves HTTP.
    pub status: &'static str,
}

/// The answer to `GET /readyz` when the gateway can predict.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: &'static str,
    /// The default model, which answered its readiness check.
    pub model: String,
}

/// Liveness: cheap, never asks the model tier.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process serves HTTP", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the default model is ready on the model tier and the gateway is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready to predict", body = Ready),
        (status = 503, description = "Not ready: shutting down, or the model tier or default model is not ready", body = ErrorBody),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let config = &state.config;
    let not_ready = |message: String| {
        let body = ErrorBody::new("not_ready", message);
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    // Turned on by SIGTERM, before anything else stops, so balancers take this gateway out first.
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return not_ready("the gateway is shutting down".into());
    }
    match state
        .catalog
        .client()
        .ready(&config.default_model, &config.model_version)
        .await
    {
        Ok(true) => Json(Ready {
            status: "ready",
            model: config.default_model.clone(),
        })
        .into_response(),
        Ok(false) => not_ready(format!(
            "model {} is not ready on the model server",
            config.default_model
        )),
        Err(e) => not_ready(format!("model server not reachable or not ready: {e}")),
    }
}

/// The gateway's metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    if state.config.metrics_listen.is_some() {
        let body = ErrorBody::new("not_found", "metrics are not served on this address");
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    metrics_text(State(state)).await
}

/// `/metrics` alone, for the `--metrics-listen` listener.
pub(crate) fn metrics_router() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(metrics_text))
}

/// The gateway's metrics in the Prometheus text format, on `--metrics-listen` when that is set.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
