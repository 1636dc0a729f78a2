//! The upload page: static HTML, CSS and JavaScript compiled into the binary, no build step.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// `GET /` and the page's script and stylesheet.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(app_js))
        .routes(routes!(style_css))
}

/// The upload page.
#[utoipa::path(get, path = "/", tag = "page",
    responses((status = 200, description = "The upload page", content_type = "text/html", body = String)))]
async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// The upload page's script.
#[utoipa::path(get, path = "/static/app.js", tag = "page",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript", body = String)))]
async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

/// The upload page's stylesheet.
#[utoipa::path(get, path = "/static/style.css", tag = "page",
    responses((status = 200, description = "CSS", content_type = "text/css", body = String)))]
async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
        .into_response()
}
