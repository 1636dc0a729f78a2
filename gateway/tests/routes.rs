//! Every route and every error, against a fake model tier, without sockets (`app(state).oneshot`).

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use common::*;
use gateway::model_client::ModelError;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::ServiceExt;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

async fn send(app: axum::Router, request: Request<Body>) -> (u16, axum::http::HeaderMap, Value) {
    json_of(app.oneshot(request).await.unwrap()).await
}

async fn get(app: axum::Router, path: &str) -> (u16, axum::http::HeaderMap, Value) {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn predict_base64_returns_sorted_predictions_and_timings() {
    let fake = Arc::new(FakeModel::new());
    let body = json!({ "image": b64(&small_png()), "top_k": 3 }).to_string();
    let (status, headers, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["model"],
        json!({ "name": "efficientnet-lite0", "version": "1" })
    );
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    assert_eq!(predictions[0]["label"], "espresso");
    assert_eq!(predictions[0]["index"], 967);
    let probabilities: Vec<f64> = predictions
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .collect();
    assert!(probabilities.windows(2).all(|w| w[0] >= w[1]));
    for phase in ["fetch", "decode", "preprocess", "inference", "total"] {
        assert!(
            body["timings_ms"][phase].as_f64().unwrap() >= 0.0,
            "{phase}"
        );
    }
    let id = body["request_id"].as_str().unwrap();
    assert_eq!(headers["x-request-id"], id);
    assert_eq!(fake.seen.lock().unwrap()[0].request_id, id);
    assert_eq!(fake.seen.lock().unwrap()[0].top_k, 3);
}

#[tokio::test]
async fn client_request_id_is_echoed() {
    let request = Request::post("/predict")
        .header("x-request-id", "my-id-42")
        .body(Body::from(
            json!({ "image": b64(&small_png()) }).to_string(),
        ))
        .unwrap();
    let (status, headers, body) = send(app_with(Arc::new(FakeModel::new()), &[]), request).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-request-id"], "my-id-42");
    assert_eq!(body["request_id"], "my-id-42");

    // An id unsafe for logs is replaced.
    let request = Request::get("/healthz")
        .header("x-request-id", "a b")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(app_with(Arc::new(FakeModel::new()), &[]), request).await;
    assert_ne!(headers["x-request-id"], "a b");
    assert!(!headers["x-request-id"].is_empty());
}

#[tokio::test]
async fn default_top_k_is_five_and_model_can_be_chosen() {
    let fake = Arc::new(FakeModel::new());
    let body = json!({ "image": b64(&small_png()), "model": "other-model" }).to_string();
    let (status, _, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().unwrap().len(), 5);
    assert_eq!(body["model"]["name"], "other-model");
    assert_eq!(fake.seen.lock().unwrap()[0].spec.name, "other-model");
}

#[tokio::test]
async fn predict_multipart_upload() {
    let fake = Arc::new(FakeModel::new());
    let png = small_png();
    let request = post_multipart(&[("image", Some("dog.png"), &png), ("top_k", None, b"2")]);
    let (status, _, body) = send(app_with(fake, &[]), request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn get_test_predicts_the_bundled_image() {
    let fake = Arc::new(FakeModel::new());
    let (status, _, body) = get(app_with(fake.clone(), &[]), "/test").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().unwrap().len(), 5);
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
    assert!(gateway::routes::SAMPLE_JPEG.len() < 100 * 1024);
}

#[tokio::test]
async fn page_and_its_assets_are_served() {
    let app = app_with(Arc::new(FakeModel::new()), &[]);
    let response = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let (_, _, html) = json_of(response).await;
    let html = html.as_str().unwrap();
    for needle in [
        "id=\"file\"",
        "id=\"url\"",
        "/static/app.js",
        "/static/style.css",
        "id=\"predictions\"",
    ] {
        assert!(html.contains(needle), "page lacks {needle}");
    }
    for (path, kind) in [
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ] {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
    }
}

#[tokio::test]
async fn healthz_and_readyz() {
    let fake = Arc::new(FakeModel::new());
    let app = app_with(fake.clone(), &[]);
    let (status, _, body) = get(app.clone(), "/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, _, body) = get(app.clone(), "/readyz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    *fake.ready.lock().unwrap() = Ok(false);
    let (status, _, body) = get(app.clone(), "/readyz").await;
    assert_eq!((status, error_code(&body)), (503, "not_ready"));

    *fake.ready.lock().unwrap() = Err(ModelError::Unavailable("connection refused".into()));
    let (status, _, body) = get(app.clone(), "/readyz").await;
    assert_eq!((status, error_code(&body)), (503, "not_ready"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_time_phases() {
    let app = app_with(Arc::new(FakeModel::new()), &[]);
    get(app.clone(), "/test").await;
    send(app.clone(), post_json("{")).await;
    let response = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, _, text) = json_of(response).await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains(r#"gateway_requests_total{route="/test",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"gateway_requests_total{route="/predict",status="400"} 1"#),
        "{text}"
    );
    for phase in ["decode", "preprocess", "inference"] {
        assert!(
            text.contains(&format!(
                r#"gateway_phase_duration_seconds_count{{phase="{phase}"}} 1"#
            )),
            "{phase}: {text}"
        );
    }
    assert!(text.contains("gateway_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn unknown_route_is_a_json_404() {
    let (status, _, body) = get(app_with(Arc::new(FakeModel::new()), &[]), "/nope").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
}

// ---- client errors ----

#[tokio::test]
async fn bad_json_is_400() {
    for body in [
        "{",
        "[1,2]",
        r#"{"imgae": "x"}"#,
        r#"{"top_k": -1, "url": "http://x"}"#,
    ] {
        let (status, _, response) =
            send(app_with(Arc::new(FakeModel::new()), &[]), post_json(body)).await;
        assert_eq!((status, error_code(&response)), (400, "bad_json"), "{body}");
    }
}

#[tokio::test]
async fn neither_url_nor_image_is_400() {
    let app = app_with(Arc::new(FakeModel::new()), &[]);
    let (status, _, body) = send(app.clone(), post_json("{}")).await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    assert!(body["error"]["message"].as_str().unwrap().contains("url"));
    let (status, _, body) = send(app.clone(), post_multipart(&[("top_k", None, b"3")])).await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    let both = json!({ "url": "http://example.com/a.jpg", "image": b64(&small_png()) }).to_string();
    let (status, _, body) = send(app.clone(), post_json(both)).await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    let (status, _, body) = send(
        app,
        post_json(json!({ "image": "%%%not base64" }).to_string()),
    )
    .await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
}

#[tokio::test]
async fn bad_top_k_is_400() {
    for k in [0, 1001] {
        let body = json!({ "image": b64(&small_png()), "top_k": k }).to_string();
        let (status, _, body) =
            send(app_with(Arc::new(FakeModel::new()), &[]), post_json(body)).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "bad_request"),
            "top_k {k}"
        );
    }
}

#[tokio::test]
async fn not_an_image_or_corrupt_image_is_422() {
    let mut truncated = small_png();
    truncated.truncate(80);
    for bytes in [b"this is not an image".to_vec(), truncated] {
        let body = json!({ "image": b64(&bytes) }).to_string();
        let (status, _, body) =
            send(app_with(Arc::new(FakeModel::new()), &[]), post_json(body)).await;
        assert_eq!(
            (status, error_code(&body)),
            (422, "invalid_image"),
            "{body}"
        );
    }
    let request = post_multipart(&[("image", Some("notes.txt"), b"hello")]);
    let (status, _, body) = send(app_with(Arc::new(FakeModel::new()), &[]), request).await;
    assert_eq!((status, error_code(&body)), (422, "invalid_image"));
}

#[tokio::test]
async fn image_too_large_is_413() {
    let app = app_with(Arc::new(FakeModel::new()), &["--max-image-bytes", "1000"]);
    let big = vec![0u8; 5000];
    // Base64 over the limit but within the body limit, and a body over the body limit.
    let body = json!({ "image": b64(&big[..1100]) }).to_string();
    let (status, _, response) = send(app.clone(), post_json(body)).await;
    assert_eq!((status, error_code(&response)), (413, "image_too_large"));
    let body = json!({ "image": b64(&big) }).to_string();
    let (status, _, response) = send(app.clone(), post_json(body)).await;
    assert_eq!((status, error_code(&response)), (413, "image_too_large"));
    let (status, _, response) = send(
        app.clone(),
        post_multipart(&[("image", Some("big.bin"), &big)]),
    )
    .await;
    assert_eq!((status, error_code(&response)), (413, "image_too_large"));
    let (status, _, response) = send(
        app,
        post_multipart(&[("image", Some("b.bin"), &big[..1200])]),
    )
    .await;
    assert_eq!((status, error_code(&response)), (413, "image_too_large"));
}

#[tokio::test]
async fn decompression_bomb_header_is_413_before_decoding() {
    let fake = Arc::new(FakeModel::new());
    let body = json!({ "image": b64(&png_header(20_000, 20_000)) }).to_string();
    let (status, _, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(
        (status, error_code(&body)),
        (413, "image_too_large"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("20000x20000")
    );
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn refused_url_is_403_with_the_reason() {
    let body = json!({ "url": "http://169.254.169.254/latest/meta-data/" }).to_string();
    let (status, _, body) = send(app_with(Arc::new(FakeModel::new()), &[]), post_json(body)).await;
    assert_eq!((status, error_code(&body)), (403, "url_refused"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("link-local"),
        "{body}"
    );
}

#[tokio::test]
async fn invalid_url_is_400() {
    for url in ["not a url", "ftp://example.com/a.jpg", "file:///etc/passwd"] {
        let body = json!({ "url": url }).to_string();
        let (status, _, body) =
            send(app_with(Arc::new(FakeModel::new()), &[]), post_json(body)).await;
        assert_eq!((status, error_code(&body)), (400, "invalid_url"), "{url}");
    }
}

#[tokio::test]
async fn unreachable_url_is_502() {
    // Allow-listed loopback port 1: nothing listens there, so the connection is refused at once.
    let app = app_with(Arc::new(FakeModel::new()), &["--fetch-allow", "127.0.0.1"]);
    let body = json!({ "url": "http://127.0.0.1:1/cat.jpg" }).to_string();
    let (status, _, body) = send(app, post_json(body)).await;
    assert_eq!((status, error_code(&body)), (502, "fetch_failed"), "{body}");
}

// ---- model-tier errors ----

#[tokio::test]
async fn unknown_model_is_404() {
    let fake = Arc::new(FakeModel::new());
    let body = json!({ "image": b64(&small_png()), "model": "resnet-9000" }).to_string();
    let (status, _, body) = send(app_with(fake, &[]), post_json(body)).await;
    assert_eq!((status, error_code(&body)), (404, "model_not_found"));
}

#[tokio::test]
async fn model_tier_statuses_map_to_http() {
    let cases = [
        (
            ModelError::InvalidArgument("bad shape".into()),
            422,
            "invalid_input",
        ),
        (
            ModelError::NotFound("version 7".into()),
            404,
            "model_not_found",
        ),
        (
            ModelError::Overloaded("queue full".into()),
            429,
            "model_overloaded",
        ),
        (
            ModelError::Unavailable("not ready".into()),
            503,
            "model_unavailable",
        ),
        (
            ModelError::DeadlineExceeded("slow".into()),
            504,
            "model_timeout",
        ),
        (ModelError::Other("boom".into()), 502, "model_error"),
    ];
    for (error, status, code) in cases {
        let fake = Arc::new(FakeModel::failing(error));
        let (got, _, body) = get(app_with(fake, &[]), "/test").await;
        assert_eq!((got, error_code(&body)), (status, code));
    }
}

#[tokio::test]
async fn gateway_full_is_429_and_other_requests_are_unaffected() {
    let gate = Arc::new(Semaphore::new(0));
    let fake = Arc::new(FakeModel {
        gate: Some(gate.clone()),
        ..FakeModel::new()
    });
    let app = app_with(fake.clone(), &["--max-in-flight", "1"]);
    let held = tokio::spawn(get(app.clone(), "/test"));
    // Wait until the first request holds the only slot, inside the model call.
    for _ in 0..500 {
        if fake.entered.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(fake.entered.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (status, headers, body) = get(app.clone(), "/test").await;
    assert_eq!((status, error_code(&body)), (429, "overloaded"));
    assert_eq!(headers["retry-after"], "1");
    // Refused before the body is read: a full gateway spends nothing on parsing it.
    let (status, _, body) =
        json_of(app.clone().oneshot(post_json("not json")).await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (429, "overloaded"));
    let (status, _, _) = get(app.clone(), "/healthz").await;
    assert_eq!(status, 200);
    gate.add_permits(10);
    let (status, _, _) = held.await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = get(app, "/test").await;
    assert_eq!(status, 200);
}

fn preflight(origin: &str) -> Request<Body> {
    Request::options("/predict")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap()
}

fn allowed_origin(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn cors_is_off_by_default_and_allows_only_the_listed_origins() {
    let fake = Arc::new(FakeModel::new());
    let app = app_with(fake.clone(), &[]);
    let (_, headers, _) = send(app.clone(), preflight("https://app.example.com")).await;
    assert_eq!(allowed_origin(&headers), None);
    let (status, headers, _) = send(
        app,
        Request::get("/test")
            .header("origin", "https://app.example.com")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(allowed_origin(&headers), None);

    let app = app_with(
        fake.clone(),
        &["--cors-allow-origin", "https://app.example.com"],
    );
    let (status, headers, _) = send(app.clone(), preflight("https://app.example.com")).await;
    assert_eq!(status, 200);
    assert_eq!(allowed_origin(&headers), Some("https://app.example.com"));
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("content-type"), "{allowed}");
    let (_, headers, _) = send(app.clone(), preflight("https://evil.example.com")).await;
    assert_eq!(allowed_origin(&headers), None);

    // The real request: the answer names the origin and lets the app read the request id.
    let mut request = post_json(json!({"image": b64(&small_png())}).to_string());
    request
        .headers_mut()
        .insert("origin", "https://app.example.com".parse().unwrap());
    let (status, headers, body) = send(app.clone(), request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(allowed_origin(&headers), Some("https://app.example.com"));
    let exposed = headers["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    let app = app_with(fake, &["--cors-allow-origin", "*"]);
    let (_, headers, _) = send(app, preflight("https://anywhere.example.com")).await;
    assert_eq!(allowed_origin(&headers), Some("*"));
}
