//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, generated from the handlers and the types they
//! read and answer with.

use std::sync::LazyLock;

use axum::Json;
use utoipa::OpenApi;

use crate::error::ErrorBody;

/// What the document says beyond the routes: its title, version and licence come from the crate.
#[derive(OpenApi)]
#[openapi(
    info(description = "HTTP gateway in front of an Open Inference Protocol model server: classify or detect objects in images sent by URL, base64 or upload, one or several per request."),
    components(schemas(ErrorBody)),
    tags(
        (name = "predict", description = "Classification and detection"),
        (name = "models", description = "What the model tier serves"),
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "page", description = "The upload page"),
        (name = "meta", description = "This description"),
    )
)]
pub(crate) struct ApiDoc;

static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> =
    LazyLock::new(|| crate::routes::api(0).into_openapi());

/// The OpenAPI document of every route the gateway serves.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    &DOCUMENT
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}
