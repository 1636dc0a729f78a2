//! The HTTP side port, as Triton's: Prometheus metrics, the KServe v2 REST API (health, metadata, config,
//! statistics and inference, with Triton's binary tensors) for clients that do not speak gRPC, and Triton's
//! model repository paths (index, load, unload). Inference goes through the same service as gRPC.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use oip_proto::inference::ModelRepositoryParameter;
use oip_proto::inference::model_repository_parameter::ParameterChoice;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{InferError, invalid};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::rest;
use crate::service::{self, InferenceService};

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
    /// The inference service the gRPC port serves too.
    pub inference: Arc<InferenceService>,
    /// Largest request body, as `--max-message-size` bounds a gRPC message.
    pub max_body: usize,
    /// Set once shutdown has begun: readiness turns false before the server stops.
    pub draining: Arc<AtomicBool>,
}

/// `/metrics`, `/v2/health/live`, `/v2/health/ready`, the KServe v2 paths under `/v2` and `/v2/models/{name}`
/// (with or without `/versions/{version}`), and the repository paths `POST /v2/repository/index`,
/// `POST /v2/repository/models/{name}/load` and `.../unload`.
pub fn router(state: HttpState) -> Router {
    let max_body = state.max_body;
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(model_config),
        )
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_statistics),
        )
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// A model and, when the path names one, its version.
#[derive(Deserialize)]
struct ModelPath {
    name: String,
    #[serde(default)]
    version: String,
}

/// `GET /v2`: ServerMetadata.
async fn server_metadata(State(state): State<HttpState>) -> Json<Value> {
    Json(rest::server_metadata(state.inference.server_metadata()))
}

/// `GET /v2/models/{name}`: ModelMetadata.
async fn model_metadata(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, HttpError> {
    let metadata = state.inference.model_metadata(&p.name, &p.version)?;
    Ok(Json(rest::model_metadata(metadata)))
}

/// `GET .../ready`: 200 when the version serves, 400 when it does not, as the REST API answers readiness.
async fn model_ready(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<StatusCode, HttpError> {
    Ok(if state.inference.model_ready(&p.name, &p.version)? {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    })
}

/// `GET .../config`: ModelConfig.
async fn model_config(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, HttpError> {
    let config = state.inference.model_config(&p.name, &p.version)?;
    Ok(Json(rest::model_config(config)))
}

/// `GET .../stats`: ModelStatistics of one model or version.
async fn model_statistics(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, HttpError> {
    let stats = state.inference.model_statistics(&p.name, &p.version)?;
    Ok(Json(rest::model_statistics(stats.model_stats)))
}

/// `GET /v2/models/stats`: ModelStatistics of every model.
async fn all_statistics(State(state): State<HttpState>) -> Result<Json<Value>, HttpError> {
    let stats = state.inference.model_statistics("", "")?;
    Ok(Json(rest::model_statistics(stats.model_stats)))
}

/// `POST .../infer`: ModelInfer with JSON tensors, or binary ones after `Inference-Header-Content-Length` bytes
/// of JSON.
async fn infer(
    State(state): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let span = service::infer_span();
    observability::set_parent_from_http(&span, &headers);
    let header_length = match headers.get(rest::HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| invalid(format!("{} must be a byte count", rest::HEADER_LENGTH)))?,
        ),
    };
    let rest::Request {
        message,
        binary_outputs,
    } = rest::parse_request(&body, header_length, &p.name, &p.version)?;
    drop(body);
    let response = state.inference.infer(message, span).await?;
    let answer = rest::encode_response(response, &binary_outputs)?;
    if answer.binary.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], answer.json).into_response());
    }
    let json_length = answer.json.len().to_string();
    let mut bytes = answer.json;
    bytes.extend_from_slice(&answer.binary);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static(rest::HEADER_LENGTH),
                json_length,
            ),
        ],
        bytes,
    )
        .into_response())
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
