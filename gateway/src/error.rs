//! The API error and its one status table.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::decode::DecodeError;
use crate::fetch::FetchError;
use crate::model_client::ModelError;

/// Seconds a client told 429 should wait before trying again.
pub const RETRY_AFTER_SECS: u32 = 1;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON we expect.
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    /// The request is well-formed but says the wrong thing.
    #[error("{0}")]
    BadRequest(String),
    /// The request body or image is over the size limit.
    #[error("image is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request carries more images than `--max-images-per-request`.
    #[error("the request carries more than {limit} images, the limit per request: split it")]
    TooManyImages {
        /// The limit.
        limit: usize,
    },
    /// The image could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The image URL could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The model tier failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No valid API key, when the gateway requires one.
    #[error("{0}")]
    Unauthorized(String),
    /// The API key is over its rate.
    #[error("the API key `{name}` is over its rate of {rate} requests per second (burst {burst}); retry in {} s", retry_after_secs(*.retry_after))]
    RateLimited {
        /// The key's name.
        name: String,
        /// Its rate in requests per second.
        rate: f64,
        /// Its burst.
        burst: u32,
        /// How long until the key may send again.
        retry_after: std::time::Duration,
    },
    /// Too many predictions in flight in this gateway.
    #[error("the gateway is busy with {0} predictions; retry shortly")]
    Overloaded(usize),
    /// A bug or a lost worker thread.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How loudly an error is logged: a client's mistake is not the operator's problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The client sent something wrong, or the URL it gave misbehaved.
    Client,
    /// Capacity or availability: worth a warning, not a page.
    Capacity,
    /// Something is broken on our side.
    Server,
}

/// Carried in the response extensions so the request middleware can log the error once, in its span.
#[derive(Debug, Clone)]
pub struct LoggedError {
    /// Stable error code.
    pub code: &'static str,
    /// Message sent to the client.
    pub message: String,
    /// How loudly to log it.
    pub severity: Severity,
}

impl ApiError {
    /// HTTP status, stable error code and log severity: the one table.
    pub fn classify(&self) -> (StatusCode, &'static str, Severity) {
        use Severity::*;
        match self {
            ApiError::BadJson(_) => (StatusCode::BAD_REQUEST, "bad_json", Client),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", Client),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", Client),
            ApiError::TooManyImages { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_images", Client)
            }
            ApiError::Decode(DecodeError::TooManyPixels { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", Client)
            }
            ApiError::Decode(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_image", Client),
            ApiError::Fetch(FetchError::InvalidUrl(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_url", Client)
            }
            ApiError::Fetch(FetchError::Refused(_)) => {
                (StatusCode::FORBIDDEN, "url_refused", Client)
            }
            ApiError::Fetch(FetchError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", Client)
            }
            ApiError::Fetch(FetchError::Timeout) => {
                (StatusCode::GATEWAY_TIMEOUT, "fetch_timeout", Client)
            }
            ApiError::Fetch(FetchError::Upstream(_)) => {
                (StatusCode::BAD_GATEWAY, "fetch_failed", Client)
            }
            ApiError::Model(ModelError::NotFound(_)) => {
                (StatusCode::NOT_FOUND, "model_not_found", Client)
            }
            ApiError::Model(ModelError::InvalidArgument(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", Client)
            }
            ApiError::Model(ModelError::Overloaded(_)) => {
                (StatusCode::TOO_MANY_REQUESTS, "model_overloaded", Capacity)
            }
            ApiError::Model(ModelError::Unavailable(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                Capacity,
            ),
            ApiError::Model(ModelError::DeadlineExceeded(_)) => {
                (StatusCode::GATEWAY_TIMEOUT, "model_timeout", Capacity)
            }
            ApiError::Model(ModelError::Unsupported(_)) => {
                (StatusCode::BAD_GATEWAY, "model_unsupported", Server)
            }
            ApiError::Model(ModelError::Other(_)) => {
                (StatusCode::BAD_GATEWAY, "model_error", Server)
            }
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", Client),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Client),
            ApiError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded", Capacity),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", Server),
        }
    }
}

/// `Retry-After` in whole seconds, rounded up so a client that waits that long is let in.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable code to branch on and a message for people.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: `bad_request`, `invalid_image`, `model_not_found`, ...
    pub code: String,
    /// What happened and, where it helps, what to send instead.
    pub message: String,
}

impl ErrorBody {
    /// The body for `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, severity) = self.classify();
        let message = self.to_string();
        let body = ErrorBody::new(code, message.clone());
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::RateLimited { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
            }
            // Shedding is meant to be brief: tell well-behaved clients when to come back.
            _ if status == StatusCode::TOO_MANY_REQUESTS => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gateway\""),
                );
            }
            _ => {}
        }
        response.extensions_mut().insert(LoggedError {
            code,
            message,
            severity,
        });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_never_server_severity() {
        let client_caused = [
            ApiError::BadJson("x".into()),
            ApiError::BadRequest("x".into()),
            ApiError::TooLarge { limit: 1 },
            ApiError::TooManyImages { limit: 1 },
            ApiError::Decode(DecodeError::UnknownFormat),
            ApiError::Fetch(FetchError::Timeout),
            ApiError::Fetch(FetchError::Upstream("x".into())),
            ApiError::Model(ModelError::NotFound("x".into())),
        ];
        for error in client_caused {
            assert_eq!(error.classify().2, Severity::Client, "{error:?}");
        }
    }
}
