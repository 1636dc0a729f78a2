//! HTTP handlers: predict and detect (JSON or multipart, one image or several), the bundled test image, the model
//! listing, and the router with every route and its OpenAPI description. Every route is fixed: nothing here
//! forwards a call of the client's choosing to the model tier, so its control calls (loading, unloading) stay out
//! of reach.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::batch::Answer;
use crate::detect::{DetectResponse, detect};
use crate::error::{ApiError, ErrorBody};
use crate::models::ModelList;
use crate::predict::{ImageSource, PredictInput, PredictResponse, admit, predict};
use crate::request::{PredictForm, PredictJson, parse_input};
use crate::telemetry::RequestId;
use crate::{AppState, Config, health, openapi, page};

/// A photo of an espresso, predicted by `GET /test`.
pub const SAMPLE_JPEG: &[u8] = include_bytes!("../assets/sample.jpg");

/// Every route, without middleware.
pub fn router(state: &AppState) -> Router<AppState> {
    let (router, _) = api(body_limit(&state.config)).split_for_parts();
    router.fallback(not_found)
}

/// Every route with its OpenAPI description; `body_limit` caps predict and detect bodies.
pub(crate) fn api(body_limit: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(predict_route).layer(DefaultBodyLimit::max(body_limit)))
        .routes(routes!(detect_route).layer(DefaultBodyLimit::max(body_limit)))
        .routes(routes!(test_route))
        .routes(routes!(models_route))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::openapi_json))
        .merge(page::router())
}

/// The largest predict or detect body: every image at its limit, base64 making each a third bigger than the image it
/// carries, plus a little framing.
fn body_limit(config: &Config) -> usize {
    let per_image = config.max_image_bytes.saturating_mul(4) / 3 + 64 * 1024;
    per_image.saturating_mul(config.max_images_per_request)
}

/// The failures `POST /predict` and `POST /detect` share beyond their own 400. Never built: it only describes
/// those responses in the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ImageErrors {
    #[response(
        status = 403,
        description = "The image URL points somewhere the gateway may not fetch"
    )]
    Forbidden(ErrorBody),
    #[response(status = 404, description = "No such model or version")]
    NotFound(ErrorBody),
    #[response(
        status = 413,
        description = "An image, its pixels or the number of images over the limit"
    )]
    TooLarge(ErrorBody),
    #[response(
        status = 422,
        description = "The image does not decode, or the model refused the input"
    )]
    Unprocessable(ErrorBody),
    #[response(
        status = 429,
        description = "The gateway or the model tier is full; retry after Retry-After"
    )]
    Full(ErrorBody),
    #[response(status = 502, description = "The image URL or the model tier failed")]
    BadGateway(ErrorBody),
    #[response(status = 503, description = "The model tier is not available")]
    Unavailable(ErrorBody),
    #[response(
        status = 504,
        description = "Fetching the image or the model call timed out"
    )]
    Timeout(ErrorBody),
}

/// Classifies one image, or several in one batch: JSON `url`, `image` (base64) or an `images` list, or a multipart
/// form with one or more `image` files or a `url`.
#[utoipa::path(post, path = "/predict", operation_id = "predict", tag = "predict",
    request_body(
        description = "One image (`url` or `image`) or several (`images`, answered one result per image in order)",
        content((PredictJson = "application/json"), (PredictForm = "multipart/form-data")),
    ),
    responses(
        (status = 200, description = "One answer for the single-image forms; `results`, one per image in order, for a list", body = Answer<PredictResponse>),
        (status = 400, description = "A malformed request, bad base64, bad top_k or version, or a detector's name", body = ErrorBody),
        ImageErrors,
    ))]
async fn predict_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    request: Request,
) -> Result<Json<Answer<PredictResponse>>, ApiError> {
    let _admitted = admit(&state)?;
    let config = &state.config;
    let input = parse_input(
        request,
        config.max_image_bytes,
        config.max_images_per_request,
    )
    .await?;
    Ok(Json(predict(&state, input, &id).await?))
}

/// Finds objects in one image, or several in one batch; the request takes the forms of `POST /predict`, with
/// `min_score` instead of `top_k`.
#[utoipa::path(post, path = "/detect", operation_id = "detect", tag = "predict",
    request_body(
        description = "One image (`url` or `image`) or several (`images`, answered one result per image in order)",
        content((PredictJson = "application/json"), (PredictForm = "multipart/form-data")),
    ),
    responses(
        (status = 200, description = "One answer for the single-image forms; `results`, one per image in order, for a list", body = Answer<DetectResponse>),
        (status = 400, description = "A malformed request, bad base64, bad min_score or version, or a classifier's name", body = ErrorBody),
        ImageErrors,
    ))]
async fn detect_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    request: Request,
) -> Result<Json<Answer<DetectResponse>>, ApiError> {
    let _admitted = admit(&state)?;
    let config = &state.config;
    let input = parse_input(
        request,
        config.max_image_bytes,
        config.max_images_per_request,
    )
    .await?;
    Ok(Json(detect(&state, input, &id).await?))
}

/// Classifies the bundled photo of an espresso: a smoke test of the whole path.
#[utoipa::path(get, path = "/test", operation_id = "test", tag = "predict",
    responses(
        (status = 200, description = "The bundled photo's classes", body = PredictResponse),
        (status = 429, description = "The gateway or the model tier is full", body = ErrorBody),
        (status = 502, description = "The model tier failed", body = ErrorBody),
        (status = 503, description = "The model tier is not available", body = ErrorBody),
        (status = 504, description = "The model call timed out", body = ErrorBody),
    ))]
async fn test_route(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
) -> Result<Json<Answer<PredictResponse>>, ApiError> {
    let _admitted = admit(&state)?;
    let input = PredictInput {
        images: vec![Ok(ImageSource::Bytes(Bytes::from_static(SAMPLE_JPEG)))],
        batch: false,
        model: None,
        version: None,
        top_k: None,
        min_score: None,
    };
    Ok(Json(predict(&state, input, &id).await?))
}

/// Every model and version the model tier has, newest version first, with the defaults requests get.
#[utoipa::path(get, path = "/v1/models", operation_id = "list_models", tag = "models",
    responses(
        (status = 200, description = "The model tier's repository", body = ModelList),
        (status = 503, description = "The model tier is not available", body = ErrorBody),
    ))]
async fn models_route(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let entries = state.catalog.client().repository().await?;
    let config = &state.config;
    Ok(Json(ModelList::new(
        entries,
        &config.default_model,
        &config.model_version,
    )))
}

async fn not_found() -> Response {
    let body = ErrorBody::new(
        "not_found",
        "no such route; see GET / for the page, POST /predict, POST /detect, GET /v1/models and GET /openapi.json for the API",
    );
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}
