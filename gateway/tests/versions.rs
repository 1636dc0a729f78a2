//! Model versions changing under the gateway: the real gRPC client against the fake model tier
//! (`common::oip`), whose versions each test rolls out while it runs; HTTP through `app(state).oneshot`.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use common::oip::{FakeServer, SECRET_REASON};
use common::{json_of, post_json, post_multipart, small_png};
use gateway::AppState;
use gateway::model_client::{ClientOptions, GrpcModelClient, SystemResolver};
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "efficientnet-lite0";

/// A gateway in front of `address`, with `flags`.
fn gateway_to(address: &str, flags: &[&str]) -> axum::Router {
    let mut all = vec!["--model-server", address];
    all.extend_from_slice(flags);
    let config = common::config(&all);
    let options = ClientOptions::from_config(&config).unwrap();
    let client = GrpcModelClient::start(options, Arc::new(SystemResolver));
    gateway::app(AppState::new(config, Arc::new(client)).unwrap())
}

/// The fake model tier and a gateway in front of it.
struct Stack {
    server: FakeServer,
    app: axum::Router,
}

impl Stack {
    async fn start(flags: &[&str]) -> Stack {
        let server = FakeServer::start("127.0.0.1:0", Duration::ZERO).await;
        let app = gateway_to(&format!("http://{}", server.addr), flags);
        Stack { server, app }
    }

    /// Makes the default model have exactly `versions`: (version, state, input size).
    fn serve(&self, versions: &[(u64, &'static str, i64)]) {
        self.server.repository.set(MODEL, versions);
    }

    async fn send(&self, request: Request<Body>) -> (u16, Value) {
        let (status, _, body) = json_of(self.app.clone().oneshot(request).await.unwrap()).await;
        (status, body)
    }

    /// A JSON prediction of a small image with the extra `fields`.
    async fn predict(&self, fields: Value) -> (u16, Value) {
        let image = base64::engine::general_purpose::STANDARD.encode(small_png());
        let mut body = json!({ "image": image });
        if let (Value::Object(body), Value::Object(fields)) = (&mut body, fields) {
            body.extend(fields);
        }
        self.send(post_json(body.to_string())).await
    }

    /// The version that answered a prediction expected to succeed.
    async fn version_answering(&self, fields: Value) -> String {
        let (status, body) = self.predict(fields).await;
        assert_eq!(status, 200, "{body}");
        body["model"]["version"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    /// The version named by every ModelInfer the fake received.
    fn asked(&self) -> Vec<String> {
        self.server.counters.asked()
    }

    fn metadata_calls(&self) -> u64 {
        self.server.counters.metadata_calls.load(Ordering::SeqCst)
    }
}

fn error_of(body: &Value) -> (&str, &str) {
    (
        body["error"]["code"].as_str().unwrap_or_default(),
        body["error"]["message"].as_str().unwrap_or_default(),
    )
}

#[tokio::test]
async fn without_a_version_the_highest_served_runs_on_pixels_of_its_size() {
    let stack = Stack::start(&[]).await;
    // 10 is newer than 9, and takes smaller images: pixels sized for 9 would be refused with 422.
    stack.serve(&[(9, "READY", 224), (10, "READY", 160)]);
    assert_eq!(stack.version_answering(json!({})).await, "10");
    assert_eq!(stack.asked(), ["10"]);
}

#[tokio::test]
async fn a_replaced_version_is_followed_within_the_request_that_finds_it_gone() {
    let stack = Stack::start(&[]).await;
    assert_eq!(stack.version_answering(json!({})).await, "1");
    // Version 2 comes, at another size. Version 1 is still served, so it runs until the entry expires.
    stack.serve(&[(1, "READY", 224), (2, "READY", 192)]);
    assert_eq!(stack.version_answering(json!({})).await, "1");
    // Version 1 goes: the metadata is read again and the call made on version 2, at its size.
    stack.serve(&[(2, "READY", 192)]);
    assert_eq!(stack.version_answering(json!({})).await, "2");
    assert_eq!(stack.asked(), ["1", "1", "1", "2"]);
    assert_eq!(stack.metadata_calls(), 2);
}

#[tokio::test]
async fn a_version_being_unloaded_is_left_for_the_newest() {
    // One attempt per call, so every repeat below is the gateway's version retry.
    let stack = Stack::start(&["--max-attempts", "1"]).await;
    assert_eq!(stack.version_answering(json!({})).await, "1");
    stack.serve(&[(1, "UNLOADING", 224), (2, "READY", 192)]);
    assert_eq!(stack.version_answering(json!({})).await, "2");
    assert_eq!(stack.asked(), ["1", "1", "2"]);
}

#[tokio::test]
async fn a_new_version_is_taken_up_when_the_metadata_expires() {
    let stack = Stack::start(&["--metadata-ttl-secs", "0"]).await;
    assert_eq!(stack.version_answering(json!({})).await, "1");
    stack.serve(&[(1, "READY", 224), (2, "READY", 192)]);
    assert_eq!(stack.version_answering(json!({})).await, "2");
    assert_eq!(stack.asked(), ["1", "2"]);
}

#[tokio::test]
async fn a_named_version_runs_as_asked_in_json_and_multipart() {
    let stack = Stack::start(&[]).await;
    stack.serve(&[(1, "READY", 224), (2, "READY", 192)]);
    for version in [json!("1"), json!(1), json!(" 01 ")] {
        let answered = stack.version_answering(json!({ "version": version })).await;
        assert_eq!(answered, "1", "{version}");
    }
    let png = small_png();
    let form = post_multipart(&[("image", Some("a.png"), &png), ("version", None, b"1")]);
    let (status, body) = stack.send(form).await;
    assert_eq!(
        (status, body["model"]["version"].as_str()),
        (200, Some("1"))
    );
    // Empty, as a form sends an untouched field: the newest.
    assert_eq!(stack.version_answering(json!({ "version": "" })).await, "2");
    assert_eq!(stack.asked(), ["1", "1", "1", "1", "2"]);
}

#[tokio::test]
async fn the_request_version_overrides_the_configured_one() {
    let stack = Stack::start(&["--model-version", "1"]).await;
    stack.serve(&[(1, "READY", 224), (2, "READY", 192)]);
    assert_eq!(stack.version_answering(json!({})).await, "1");
    assert_eq!(
        stack.version_answering(json!({ "version": "2" })).await,
        "2"
    );
    assert_eq!(stack.asked(), ["1", "2"]);
}

#[tokio::test]
async fn a_named_version_gone_is_a_404_saying_what_exists_without_a_retry() {
    let stack = Stack::start(&[]).await;
    stack.serve(&[(1, "READY", 224), (2, "READY", 192)]);
    assert_eq!(
        stack.version_answering(json!({ "version": "1" })).await,
        "1"
    );
    let metadata_calls = stack.metadata_calls();

    stack.serve(&[(2, "READY", 192)]);
    let (status, body) = stack.predict(json!({ "version": "1" })).await;
    let (code, message) = error_of(&body);
    assert_eq!((status, code), (404, "model_not_found"), "{body}");
    assert!(message.contains("available: 2"), "{message}");
    // Neither version 1 again nor version 2: the client asked for 1.
    assert_eq!(stack.asked(), ["1", "1"]);
    assert_eq!(stack.metadata_calls(), metadata_calls);

    // The dead entry was dropped: the next request asks the model tier, which says the same.
    let (status, body) = stack.predict(json!({ "version": "1" })).await;
    assert_eq!(
        (status, error_of(&body).0),
        (404, "model_not_found"),
        "{body}"
    );
    assert_eq!(stack.metadata_calls(), metadata_calls + 1);
    assert_eq!(stack.asked(), ["1", "1"]);
}

#[tokio::test]
async fn a_bad_version_is_a_400_before_any_model_call() {
    let stack = Stack::start(&[]).await;
    let bad = [
        json!("0"),
        json!("-1"),
        json!("1.5"),
        json!("v2"),
        json!("+2"),
        json!("2 3"),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(true),
        json!(["1"]),
    ];
    for version in bad {
        let (status, body) = stack.predict(json!({ "version": version })).await;
        let (code, message) = error_of(&body);
        assert_eq!((status, code), (400, "bad_request"), "{version}: {body}");
        assert!(message.contains("positive integer"), "{message}");
    }
    let png = small_png();
    for text in [&b"abc"[..], b"0", b"-3"] {
        let form = post_multipart(&[("image", Some("a.png"), &png), ("version", None, text)]);
        let (status, body) = stack.send(form).await;
        assert_eq!((status, error_of(&body).0), (400, "bad_request"), "{body}");
    }
    assert!(stack.asked().is_empty());
    assert_eq!(stack.metadata_calls(), 0);
}

#[tokio::test]
async fn models_lists_every_version_newest_first_without_reasons() {
    let stack = Stack::start(&[]).await;
    stack.serve(&[
        (1, "UNLOADING", 224),
        (2, "READY", 224),
        (3, "LOADING", 192),
    ]);
    stack
        .server
        .repository
        .set("mobilenet", &[(1, "UNAVAILABLE", 224)]);
    let (status, body) = stack.get("/v1/models").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "default_model": MODEL,
            "models": [
                {
                    "name": MODEL,
                    "versions": [
                        { "version": "3", "state": "LOADING" },
                        { "version": "2", "state": "READY" },
                        { "version": "1", "state": "UNLOADING" },
                    ],
                    "default_version": "2",
                },
                {
                    "name": "mobilenet",
                    "versions": [{ "version": "1", "state": "UNAVAILABLE" }],
                    "default_version": null,
                },
            ],
        })
    );
    assert!(!body.to_string().contains(SECRET_REASON));

    // Not cached: the rollout finishing shows at once.
    stack.serve(&[(3, "READY", 192)]);
    let (_, body) = stack.get("/v1/models").await;
    assert_eq!(
        body["models"][0],
        json!({
            "name": MODEL,
            "versions": [{ "version": "3", "state": "READY" }],
            "default_version": "3",
        })
    );
}

#[tokio::test]
async fn models_with_the_model_tier_down_is_a_503() {
    // A port nothing listens on: every connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = gateway_to(&format!("http://{closed}"), &["--max-attempts", "1"]);
    let response = app
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (status, _, body) = json_of(response).await;
    assert_eq!(
        (status, error_of(&body).0),
        (503, "model_unavailable"),
        "{body}"
    );
}

#[tokio::test]
async fn no_route_forwards_control_calls() {
    let stack = Stack::start(&[]).await;
    for path in [
        "/v1/models/efficientnet-lite0/load",
        "/v1/models/efficientnet-lite0/unload",
        "/v1/models/efficientnet-lite0/versions/1",
        "/v2/repository/models/efficientnet-lite0/unload",
        "/v2/repository/index",
        "/inference.GRPCInferenceService/RepositoryIndex",
        "/inference.GRPCInferenceService/ModelInfer",
    ] {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let (status, body) = stack.send(request).await;
        assert_eq!((status, error_of(&body).0), (404, "not_found"), "{path}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let request = Request::builder()
            .method(method)
            .uri("/v1/models")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _) = stack.send(request).await;
        assert_eq!(status, 405, "{method} /v1/models");
    }
    assert!(stack.asked().is_empty());
    assert_eq!(stack.metadata_calls(), 0);
}
