//! HTTP handlers: predict and detect (JSON or multipart), the bundled test image, the model listing, health,
//! readiness and metrics. Every route is fixed: nothing here forwards a call of the client's choosing to
//! the model tier, so its control calls (loading, unloading) stay out of reach.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::detect::detect;
use crate::error::ApiError;
use crate::model_client::parse_version;
use crate::models::ModelList;
use crate::page;
use crate::predict::{ImageSource, PredictInput, admit, predict};
use crate::telemetry::RequestId;

/// A photo of an espresso, predicted by `GET /test`.
pub const SAMPLE_JPEG: &[u8] = include_bytes!("../assets/sample.jpg");

/// Padding is optional: browsers and command-line tools disagree about it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Every route, without middleware.
pub fn router(state: &AppState) -> Router<AppState> {
    // Base64 makes a body a third bigger than the image it carries; multipart adds a little framing.
    let body_limit = state.config.max_image_bytes.saturating_mul(4) / 3 + 64 * 1024;
    Router::new()
        .route(
            "/predict",
            post(predict_route).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route(
            "/detect",
            post(detect_route).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/test", get(test_route))
        .route("/v1/models", get(models_route))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(page::router())
        .fallback(not_found)
}

/// The JSON form of a predict request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictJson {
    url: Option<String>,
    image: Option<String>,
    top_k: Option<u32>,
    /// Detection only.
    min_score: Option<f32>,
    model: Option<String>,
    /// A string or a number; read by [`json_version`] so a wrong one gets a message saying what to send.
    version: Option<serde_json::Value>,
}

async fn predict_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    request: Request,
) -> Result<Response, ApiError> {
    let _admitted = admit(&state)?;
    let input = parse_input(&state, request).await?;
    Ok(Json(predict(&state, input, &id).await?).into_response())
}

async fn detect_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    request: Request,
) -> Result<Response, ApiError> {
    let _admitted = admit(&state)?;
    let input = parse_input(&state, request).await?;
    Ok(Json(detect(&state, input, &id).await?).into_response())
}

async fn test_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
) -> Result<Response, ApiError> {
    let _admitted = admit(&state)?;
    let input = PredictInput {
        source: ImageSource::Bytes(Bytes::from_static(SAMPLE_JPEG)),
        model: None,
        version: None,
        top_k: None,
        min_score: None,
    };
    Ok(Json(predict(&state, input, &id).await?).into_response())
}

async fn models_route(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let entries = state.catalog.client().repository().await?;
    let config = &state.config;
    Ok(Json(ModelList::new(
        entries,
        &config.default_model,
        &config.model_version,
    )))
}

async fn parse_input(state: &AppState, request: Request) -> Result<PredictInput, ApiError> {
    let limit = state.config.max_image_bytes;
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if is_multipart {
        return parse_multipart(request, limit).await;
    }
    // Anything else is taken as JSON, so `curl -d '{"url": ...}'` works without a Content-Type.
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit }
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
    let parsed: PredictJson =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let version = json_version(parsed.version.as_ref())?;
    let source = match (parsed.url, parsed.image) {
        (Some(url), None) => ImageSource::Url(url),
        (None, Some(image)) => ImageSource::Bytes(decode_base64(&image, limit)?),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "send either \"url\" or \"image\", not both".into(),
            ));
        }
        (None, None) => return Err(missing_image()),
    };
    Ok(PredictInput {
        source,
        model: parsed.model,
        version,
        top_k: parsed.top_k,
        min_score: parsed.min_score,
    })
}

async fn parse_multipart(request: Request, limit: usize) -> Result<PredictInput, ApiError> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("invalid multipart form: {}", e.body_text())))?;
    let (mut image, mut url, mut model, mut version, mut top_k, mut min_score) =
        (None, None, None, None, None, None);
    let too_large_or_bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::BadRequest(format!("invalid multipart form: {}", e.body_text()))
        }
    };
    while let Some(field) = multipart.next_field().await.map_err(too_large_or_bad)? {
        match field.name().unwrap_or_default() {
            "image" => {
                let bytes = field.bytes().await.map_err(too_large_or_bad)?;
                if bytes.len() > limit {
                    return Err(ApiError::TooLarge { limit });
                }
                image = Some(bytes);
            }
            "url" => url = Some(field.text().await.map_err(too_large_or_bad)?),
            "model" => model = Some(field.text().await.map_err(too_large_or_bad)?),
            "version" => {
                let text = field.text().await.map_err(too_large_or_bad)?;
                version = text_version(&text)?;
            }
            "top_k" => {
                let text = field.text().await.map_err(too_large_or_bad)?;
                let k = text.trim().parse::<u32>().map_err(|_| {
                    ApiError::BadRequest(format!("top_k must be a positive integer, got `{text}`"))
                })?;
                top_k = Some(k);
            }
            "min_score" => {
                let text = field.text().await.map_err(too_large_or_bad)?;
                let score = text.trim().parse::<f32>().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "min_score must be a number between 0 and 1, got `{text}`"
                    ))
                })?;
                min_score = Some(score);
            }
            _ => {}
        }
    }
    let source = match (url.filter(|u| !u.trim().is_empty()), image) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "send either an image file or a url, not both".into(),
            ));
        }
        (Some(url), None) => ImageSource::Url(url),
        (None, Some(image)) if image.is_empty() => {
            return Err(ApiError::BadRequest("the image file is empty".into()));
        }
        (None, Some(image)) => ImageSource::Bytes(image),
        (None, None) => return Err(missing_image()),
    };
    Ok(PredictInput {
        source,
        model: model.filter(|m| !m.trim().is_empty()),
        version,
        top_k,
        min_score,
    })
}

/// A version given as text: a positive decimal integer, returned without leading zeros; empty means
/// none was asked for, as with `model`.
fn text_version(text: &str) -> Result<Option<String>, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    parse_version(text)
        .map(|v| Some(v.to_string()))
        .ok_or_else(|| bad_version(text))
}

/// A version given in JSON: the same text as a string, or a positive integer as a number.
fn json_version(value: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => text_version(text),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .filter(|&v| v > 0)
            .map(|v| Some(v.to_string()))
            .ok_or_else(|| bad_version(&n.to_string())),
        Some(other) => Err(bad_version(&other.to_string())),
    }
}

fn bad_version(got: &str) -> ApiError {
    // Only the start is echoed: the field can be as long as the body.
    let got: String = got.chars().take(32).collect();
    ApiError::BadRequest(format!(
        "version must be a positive integer such as \"2\" (GET /v1/models lists the versions served), got `{got}`"
    ))
}

fn missing_image() -> ApiError {
    ApiError::BadRequest(
        "no image: send JSON {\"url\": \"https://...\"} or {\"image\": \"<base64>\"}, or a multipart form with an `image` file"
            .into(),
    )
}

fn decode_base64(text: &str, limit: usize) -> Result<Bytes, ApiError> {
    // Data URLs from a browser's FileReader are accepted as they are.
    let text = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    let text = text.trim();
    if text.len() / 4 * 3 > limit + 3 {
        return Err(ApiError::TooLarge { limit });
    }
    let bytes = BASE64
        .decode(text)
        .map_err(|e| ApiError::BadRequest(format!("\"image\" is not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("\"image\" is empty".into()));
    }
    if bytes.len() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    Ok(bytes.into())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let config = &state.config;
    let not_ready = |message: String| {
        let body = json!({ "error": { "code": "not_ready", "message": message } });
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
        Ok(true) => {
            Json(json!({ "status": "ready", "model": config.default_model })).into_response()
        }
        Ok(false) => not_ready(format!(
            "model {} is not ready on the model server",
            config.default_model
        )),
        Err(e) => not_ready(format!("model server not reachable or not ready: {e}")),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn not_found() -> Response {
    let body = json!({ "error": { "code": "not_found", "message": "no such route; see GET / for the page, POST /predict, POST /detect and GET /v1/models for the API" } });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}
