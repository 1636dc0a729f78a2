//! Several images in one predict request, against a fake model tier without sockets: one batched model call, one
//! result per image in order, an image that fails gets its own error, and the limit per request.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use common::*;
use gateway::model_client::ModelError;
use serde_json::{Value, json};
use tower::ServiceExt;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn send(app: axum::Router, request: Request<Body>) -> (u16, Value) {
    let (status, _, body) = json_of(app.oneshot(request).await.unwrap()).await;
    (status, body)
}

fn coloring() -> Arc<FakeModel> {
    Arc::new(FakeModel {
        index_by_color: true,
        ..FakeModel::new()
    })
}

/// The red value of image `i` of a batch: the fake answers it as the top class index.
fn red(i: usize) -> u8 {
    (i * 10 + 5) as u8
}

fn results(body: &Value) -> &Vec<Value> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results in {body}"))
}

fn top_index(result: &Value) -> i64 {
    result["predictions"][0]["index"]
        .as_i64()
        .unwrap_or_else(|| panic!("no prediction in {result}"))
}

#[tokio::test]
async fn eight_images_give_eight_results_in_order_from_one_model_call() {
    let fake = coloring();
    let images: Vec<Value> = (0..8)
        .map(|i| json!({ "image": b64(&solid_png(red(i))) }))
        .collect();
    let body = json!({ "images": images, "top_k": 2 }).to_string();
    let (status, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(status, 200, "{body}");
    let results = results(&body);
    assert_eq!(results.len(), 8);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(top_index(result), i64::from(red(i)), "image {i}: {result}");
        assert_eq!(result["predictions"].as_array().unwrap().len(), 2);
        assert_eq!(result["model"]["name"], "efficientnet-lite0");
        assert!(result["timings_ms"]["inference"].as_f64().unwrap() >= 0.0);
        assert!(result["request_id"].is_string());
    }
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one model call for the batch");
    assert_eq!(seen[0].images.len(), 8);
    assert_eq!(seen[0].top_k, 2);
}

/// Found by the predict-body fuzz target: the parser takes any `top_k`, so the range check once the model is known
/// must hold for the list form as for a single image, before any model call.
#[tokio::test]
async fn a_batch_with_top_k_out_of_range_is_400_without_a_model_call() {
    for k in [0, 1001] {
        let fake = coloring();
        let images: Vec<Value> = (0..3)
            .map(|i| json!({ "image": b64(&solid_png(red(i))) }))
            .collect();
        let body = json!({ "images": images, "top_k": k }).to_string();
        let (status, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
        assert_eq!(status, 400, "top_k {k}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("top_k must be between 1 and"),
            "{body}"
        );
        assert!(
            fake.seen.lock().unwrap().is_empty(),
            "top_k {k}: the model was called"
        );
    }
}

#[tokio::test]
async fn a_broken_image_gets_its_own_422_and_the_others_succeed() {
    let fake = coloring();
    let images: Vec<Value> = (0..8)
        .map(|i| {
            let bytes = if i == 3 {
                b"this is not an image".to_vec()
            } else {
                solid_png(red(i))
            };
            json!({ "image": b64(&bytes) })
        })
        .collect();
    let body = json!({ "images": images }).to_string();
    let (status, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(status, 200, "{body}");
    let results = results(&body);
    assert_eq!(results.len(), 8);
    assert_eq!(results[3]["status"], 422, "{}", results[3]);
    assert_eq!(results[3]["error"]["code"], "invalid_image");
    assert!(results[3].get("predictions").is_none());
    for i in (0..8).filter(|&i| i != 3) {
        assert_eq!(top_index(&results[i]), i64::from(red(i)), "image {i}");
    }
    let seen = fake.seen.lock().unwrap();
    assert_eq!((seen.len(), seen[0].images.len()), (1, 7));
}

#[tokio::test]
async fn each_image_fails_with_the_status_it_would_get_alone() {
    let fake = coloring();
    let body = json!({ "images": [
        { "image": "%%% not base64" },
        { "url": "http://169.254.169.254/latest/meta-data/" },
        { "url": "not a url" },
        { "url": "http://example.com/a.jpg", "image": b64(&solid_png(1)) },
        {},
        { "image": b64(&png_header(20_000, 20_000)) },
        { "image": b64(&solid_png(red(6))) },
    ]})
    .to_string();
    let (status, body) = send(app_with(fake.clone(), &[]), post_json(body)).await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<(u64, &str)> = results(&body)[..6]
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap_or(0),
                r["error"]["code"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (400, "bad_request"),
            (403, "url_refused"),
            (400, "invalid_url"),
            (400, "bad_request"),
            (400, "bad_request"),
            (413, "image_too_large"),
        ]
    );
    assert_eq!(top_index(&results(&body)[6]), i64::from(red(6)));
}

#[tokio::test]
async fn a_batch_of_only_broken_images_answers_without_a_model_call() {
    let fake = coloring();
    let body = json!({ "images": [{ "image": b64(b"nope") }, { "image": b64(b"nor this") }] });
    let (status, body) = send(app_with(fake.clone(), &[]), post_json(body.to_string())).await;
    assert_eq!(status, 200, "{body}");
    assert!(results(&body).iter().all(|r| r["status"] == 422), "{body}");
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_model_call_fails_the_whole_request() {
    let fake = Arc::new(FakeModel::failing(ModelError::Overloaded(
        "queue full".into(),
    )));
    let images = vec![json!({ "image": b64(&small_png()) }); 3];
    let body = json!({ "images": images }).to_string();
    let (status, body) = send(app_with(fake, &[]), post_json(body)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("model_overloaded"))
    );
}

#[tokio::test]
async fn more_images_than_the_limit_is_413_naming_the_limit() {
    let fake = coloring();
    let app = app_with(fake.clone(), &["--max-images-per-request", "3"]);
    let image = json!({ "image": b64(&small_png()) });
    let body = json!({ "images": vec![image.clone(); 4] }).to_string();
    let (status, body) = send(app.clone(), post_json(body)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("too_many_images"))
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("more than 3 images"), "{message}");

    let png = small_png();
    let files = vec![("image", Some("a.png"), png.as_slice()); 4];
    let (status, body) = send(app.clone(), post_multipart(&files)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("too_many_images"))
    );
    assert!(fake.seen.lock().unwrap().is_empty());

    let body = json!({ "images": vec![image; 3] }).to_string();
    let (status, body) = send(app, post_json(body)).await;
    assert_eq!((status, results(&body).len()), (200, 3), "{body}");
}

#[test]
fn the_limit_defaults_to_16_and_must_be_at_least_1() {
    let config = <gateway::Config as clap::Parser>::try_parse_from(["gateway"]).unwrap();
    assert_eq!(config.max_images_per_request, 16);
    let err = config_error(&["--max-images-per-request", "0"]);
    assert!(err.contains("--max-images-per-request"), "{err}");
}

fn config_error(flags: &[&str]) -> String {
    let config = config(flags);
    gateway::AppState::new(config, Arc::new(FakeModel::new()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn malformed_lists_are_400() {
    let app = app_with(coloring(), &[]);
    for body in [
        json!({ "images": [] }),
        json!({ "images": [{ "image": b64(&small_png()) }], "url": "http://example.com/a.png" }),
    ] {
        let (status, response) = send(app.clone(), post_json(body.to_string())).await;
        assert_eq!(
            (status, &response["error"]["code"]),
            (400, &json!("bad_request")),
            "{body}"
        );
    }
    let unknown = json!({ "images": [{ "imgae": "x" }] }).to_string();
    let (status, response) = send(app, post_json(unknown)).await;
    assert_eq!(
        (status, &response["error"]["code"]),
        (400, &json!("bad_json"))
    );
}

#[tokio::test]
async fn a_multipart_form_with_several_image_files_is_a_batch() {
    let fake = coloring();
    let pngs: Vec<Vec<u8>> = (0..3).map(|i| solid_png(red(i))).collect();
    let request = post_multipart(&[
        ("image", Some("a.png"), &pngs[0]),
        ("top_k", None, b"2"),
        ("image", Some("b.png"), &pngs[1]),
        ("image", Some("broken.png"), b"not a png"),
        ("image", Some("c.png"), &pngs[2]),
    ]);
    let (status, body) = send(app_with(fake.clone(), &[]), request).await;
    assert_eq!(status, 200, "{body}");
    let results = results(&body);
    assert_eq!(results.len(), 4);
    assert_eq!(top_index(&results[0]), i64::from(red(0)));
    assert_eq!(top_index(&results[1]), i64::from(red(1)));
    assert_eq!(results[2]["status"], 422);
    assert_eq!(top_index(&results[3]), i64::from(red(2)));
    assert_eq!(results[3]["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(fake.seen.lock().unwrap()[0].images.len(), 3);
}

#[tokio::test]
async fn a_list_of_one_is_answered_as_a_list() {
    let body = json!({ "images": [{ "image": b64(&small_png()) }] }).to_string();
    let (status, body) = send(app_with(coloring(), &[]), post_json(body)).await;
    assert_eq!((status, results(&body).len()), (200, 1), "{body}");
}
