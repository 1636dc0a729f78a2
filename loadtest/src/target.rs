//! What one request is, per target, built once before the run so that sending costs as little CPU as possible.

use std::sync::Arc;

use bytes::Bytes;
use oip_proto::inference::ModelInferRequest;
use oip_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use tonic::transport::Channel;

use crate::report::{GATEWAY_PHASES, Outcome};

/// One prepared HTTP request; bodies are shared, never copied per request.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub url: reqwest::Url,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// In a mix, the request's kind: its failures are counted as `name:kind` (`bad_image:http_422`), so an
    /// expected refusal is told from a real error.
    pub name: Option<&'static str>,
}

/// A load target: requests are taken from its list in turn.
#[derive(Debug, Clone)]
pub enum Target {
    /// HTTP against a gateway.
    Http {
        client: reqwest::Client,
        requests: Arc<[HttpRequest]>,
    },
    /// ModelInfer against an Open Inference Protocol server.
    Grpc {
        client: GrpcInferenceServiceClient<Channel>,
        request: Arc<ModelInferRequest>,
        /// Elements the first output must have, to tell a real answer from an empty one.
        expected_output_elements: u64,
    },
}

/// The part of a gateway answer the report uses.
#[derive(Debug, Deserialize)]
struct GatewayAnswer {
    timings_ms: Option<GatewayTimings>,
}

#[derive(Debug, Deserialize)]
struct GatewayTimings {
    #[serde(default)]
    fetch: f64,
    #[serde(default)]
    decode: f64,
    #[serde(default)]
    preprocess: f64,
    #[serde(default)]
    inference: f64,
    #[serde(default)]
    total: f64,
}

impl Target {
    /// Sends request number `i` and says how it ended.
    pub async fn send(&self, i: u64) -> Outcome {
        match self {
            Target::Http { client, requests } => {
                let request = &requests[(i % requests.len() as u64) as usize];
                send_http(client, request).await
            }
            Target::Grpc {
                client,
                request,
                expected_output_elements,
            } => send_grpc(client.clone(), request, *expected_output_elements).await,
        }
    }
}

async fn send_http(client: &reqwest::Client, request: &HttpRequest) -> Outcome {
    let mut builder = client.request(request.method.clone(), request.url.clone());
    if let Some(content_type) = &request.content_type {
        builder = builder.header(CONTENT_TYPE, content_type.clone());
    }
    if !request.body.is_empty() {
        builder = builder.body(request.body.clone());
    }
    let failure = |kind: &str, bytes| match request.name {
        Some(name) => failure(&format!("{name}:{kind}"), bytes),
        None => failure(kind, bytes),
    };
    let response = match builder.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return failure("timeout", 0),
        Err(_) => return failure("transport", 0),
    };
    let status = response.status();
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) if e.is_timeout() => return failure("timeout", 0),
        Err(_) => return failure("transport", 0),
    };
    let bytes = body.len() as u64;
    if !status.is_success() {
        return failure(&format!("http_{}", status.as_u16()), bytes);
    }
    // Gateway answers carry their own phase timings; other answers (images, pages) are taken as they are.
    let timings = serde_json::from_slice::<GatewayAnswer>(&body)
        .ok()
        .and_then(|a| a.timings_ms)
        .map(|t| [t.fetch, t.decode, t.preprocess, t.inference, t.total]);
    debug_assert_eq!(GATEWAY_PHASES.len(), 5);
    Outcome::Success { bytes, timings }
}

async fn send_grpc(
    mut client: GrpcInferenceServiceClient<Channel>,
    request: &ModelInferRequest,
    expected: u64,
) -> Outcome {
    match client.model_infer(request.clone()).await {
        Ok(response) => {
            let response = response.into_inner();
            let bytes = response
                .raw_output_contents
                .iter()
                .map(|c| c.len() as u64)
                .sum();
            let elements = response.outputs.first().map(|o| {
                o.shape
                    .iter()
                    .map(|&d| u64::try_from(d).unwrap_or(0))
                    .product::<u64>()
            });
            if elements == Some(expected) {
                Outcome::Success {
                    bytes,
                    timings: None,
                }
            } else {
                failure("bad_response", bytes)
            }
        }
        Err(status) if status.code() == tonic::Code::DeadlineExceeded => failure("timeout", 0),
        Err(status) => failure(&grpc_kind(status.code()), 0),
    }
}

/// `grpc_unavailable`, `grpc_resource_exhausted`, …: the code's name in snake case.
pub fn grpc_kind(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut kind = String::from("grpc_");
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            kind.push('_');
        }
        kind.push(c.to_ascii_lowercase());
    }
    kind
}

fn failure(kind: &str, bytes: u64) -> Outcome {
    Outcome::Failure {
        kind: kind.to_owned(),
        bytes,
    }
}

/// A `multipart/form-data` body with one file field, built once.
pub fn multipart_body(field: &str, filename: &str, data: &[u8]) -> (HeaderValue, Bytes) {
    // A fixed boundary: the body is built once, and a file that happened to contain it would only make that
    // run's requests fail visibly (400s in the report).
    const BOUNDARY: &str = "loadtest-7f3a9c2e5b1d4086a1e3c5b7d9f0e2a4";
    const CONTENT_TYPE_VALUE: &str =
        "multipart/form-data; boundary=loadtest-7f3a9c2e5b1d4086a1e3c5b7d9f0e2a4";
    let mime = match filename
        .rsplit('.')
        .next()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        _ => "application/octet-stream",
    };
    let safe_name: String = filename
        .chars()
        .filter(|c| *c != '"' && !c.is_control())
        .collect();
    let mut body = Vec::with_capacity(data.len() + 256);
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{safe_name}\"\r\nContent-Type: {mime}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    debug_assert!(CONTENT_TYPE_VALUE.ends_with(BOUNDARY));
    (
        HeaderValue::from_static(CONTENT_TYPE_VALUE),
        Bytes::from(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_become_snake_case_kinds() {
        assert_eq!(grpc_kind(tonic::Code::Unavailable), "grpc_unavailable");
        assert_eq!(
            grpc_kind(tonic::Code::ResourceExhausted),
            "grpc_resource_exhausted"
        );
        assert_eq!(
            grpc_kind(tonic::Code::InvalidArgument),
            "grpc_invalid_argument"
        );
    }

    #[test]
    fn multipart_body_frames_the_file() {
        let (content_type, body) = multipart_body("image", "cat.jpg", b"JPEGDATA");
        let ct = content_type.to_str().unwrap_or_default();
        let boundary = ct.split("boundary=").nth(1).unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\n")), "{text}");
        assert!(
            text.contains("name=\"image\"; filename=\"cat.jpg\""),
            "{text}"
        );
        assert!(
            text.contains("Content-Type: image/jpeg\r\n\r\nJPEGDATA\r\n"),
            "{text}"
        );
        assert!(text.ends_with(&format!("--{boundary}--\r\n")), "{text}");
    }
}
