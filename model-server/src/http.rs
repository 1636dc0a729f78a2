//! The HTTP side port, as Triton's: Prometheus metrics and the KServe v2 health endpoints, for scrapers and
//! probes that do not speak gRPC, and Triton's model repository paths (index, load, unload).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use oip_proto::inference::ModelRepositoryParameter;
use oip_proto::inference::model_repository_parameter::ParameterChoice;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{InferError, invalid};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::service;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
    /// Set once shutdown has begun: readiness turns false before the server stops.
    pub draining: Arc<AtomicBool>,
}

/// `/metrics`, `/v2/health/live`, `/v2/health/ready`, and the repository paths `POST /v2/repository/index`,
/// `POST /v2/repository/models/{name}/load` and `.../unload`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        .with_state(state)
}

/// An error as the KServe v2 REST API answers it: the status of the shared table and `{"error": "..."}`.
struct HttpError(InferError);

impl From<InferError> for HttpError {
    fn from(e: InferError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.0.to_string() }))).into_response()
    }
}

/// A body that may be empty: Triton's clients send none when there is nothing to say.
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, InferError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the request body is not valid JSON: {e}")))
}

#[derive(Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index`: every model version and its state, as Triton's REST answer.
async fn index(State(state): State<HttpState>, body: Bytes) -> Result<Json<Value>, HttpError> {
    let request: IndexRequest = optional_json(&body)?;
    let entries: Vec<Value> = service::repository_index(&state.lifecycle, request.ready)
        .into_iter()
        .map(
            |m| json!({"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}),
        )
        .collect();
    Ok(Json(Value::Array(entries)))
}

#[derive(Default, Deserialize)]
struct ControlRequest {
    #[serde(default)]
    parameters: HashMap<String, Value>,
}

/// JSON parameters as the gRPC message carries them, so both transports share one validation.
fn grpc_parameters(
    params: HashMap<String, Value>,
) -> Result<HashMap<String, ModelRepositoryParameter>, InferError> {
    params
        .into_iter()
        .map(|(name, value)| {
            let choice = match value {
                Value::Bool(b) => ParameterChoice::BoolParam(b),
                Value::Number(n) => ParameterChoice::Int64Param(
                    n.as_i64()
                        .ok_or_else(|| invalid(format!("parameter `{name}` must be an integer")))?,
                ),
                Value::String(s) => ParameterChoice::StringParam(s),
                // An object is taken as the JSON it is, for a `config` written inline.
                object @ Value::Object(_) => ParameterChoice::StringParam(object.to_string()),
                other => {
                    return Err(invalid(format!(
                        "parameter `{name}` must be a string, number, boolean or object, not {other}"
                    )));
                }
            };
            Ok((
                name,
                ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// `POST /v2/repository/models/{name}/load`: as RepositoryModelLoad.
async fn load(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    let request: ControlRequest = optional_json(&body)?;
    let config = service::load_parameters(&grpc_parameters(request.parameters)?)?;
    let span = tracing::info_span!("repository_model_load", model = %name);
    tracing::Instrument::instrument(state.lifecycle.load_model(&name, config), span).await?;
    Ok(StatusCode::OK)
}

/// `POST /v2/repository/models/{name}/unload`: as RepositoryModelUnload.
async fn unload(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, HttpError> {
    let request: ControlRequest = optional_json(&body)?;
    service::check_unload_parameters(request.parameters.keys().map(String::as_str))?;
    let span = tracing::info_span!("repository_model_unload", model = %name);
    tracing::Instrument::instrument(state.lifecycle.unload_model(&name), span).await?;
    Ok(StatusCode::OK)
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
    if state.lifecycle.registry().all_ready() && !state.draining.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
