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
    LazyLock::new(|| with_api_keys(crate::routes::api(0).into_openapi()));

/// Describes the bearer key `--api-keys-file` asks for on every route but the open ones. Either requirement
/// satisfies the document: without the file, no key is needed.
fn with_api_keys(mut document: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .description(Some(
            "An API key from the gateway's --api-keys-file, when it has one: `Authorization: Bearer KEY`",
        ))
        .build();
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme("api_key", SecurityScheme::Http(scheme));
    for (path, item) in document.paths.paths.iter_mut() {
        if crate::access::is_open(path) {
            continue;
        }
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            operation.security = Some(vec![
                SecurityRequirement::default(),
                SecurityRequirement::new("api_key", Vec::<String>::new()),
            ]);
        }
    }
    document
}

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
