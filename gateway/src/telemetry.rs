//! The per-request middleware: request id, trace context, tracing span, metrics, one log line.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::AppState;
use crate::access::KeyName;
use crate::error::{LoggedError, Severity};

/// Header carrying the request id, accepted from the client or generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in the request extensions for handlers.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A client id is reused only if it is short printable ASCII, so it is safe in logs and headers.
fn client_request_id(request: &Request) -> Option<String> {
    let value = request.headers().get(&X_REQUEST_ID)?.to_str().ok()?;
    let valid =
        !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| value.to_owned())
}

/// Middleware: gives each request an id and a span, counts it, logs it once at a level set by who is
/// at fault, and echoes the id in the response. The span names the request's API key, never the key itself.
pub async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = client_request_id(&request).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        trace_id = tracing::field::Empty,
        method = %request.method(),
        route = %route,
        api_key = tracing::field::Empty,
    );
    // A client's W3C `traceparent` makes this request part of its trace; otherwise a new trace starts here.
    observability::set_parent_from_http(&span, request.headers());
    request.extensions_mut().insert(RequestId(id.clone()));

    let in_flight = state.metrics.request_started();
    let mut response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);

    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    span.in_scope(|| match response.extensions().get::<LoggedError>() {
        Some(e) => match e.severity {
            Severity::Client => tracing::info!(status, elapsed_ms, code = e.code, message = %e.message, "request refused"),
            Severity::Capacity => tracing::warn!(status, elapsed_ms, code = e.code, message = %e.message, "request failed"),
            Severity::Server => tracing::error!(status, elapsed_ms, code = e.code, message = %e.message, "request failed"),
        },
        // Probes and scrapes arrive every few seconds; keep them out of the default log.
        None if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") => {
            tracing::debug!(status, elapsed_ms, "request finished")
        }
        None => tracing::info!(status, elapsed_ms, "request finished"),
    });
    state.metrics.request(&route, status, elapsed);
    if let Some(KeyName(key)) = response.extensions().get::<KeyName>() {
        state.metrics.key_request(key, status);
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}
