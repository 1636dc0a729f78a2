//! Real model server + real gateway on loopback, the detector end to end: each golden photo, fetched by URL and
//! uploaded, gives every reference detection (OpenCV dnn, score >= 0.25) with IoU >= 0.9 in the photo's own
//! pixels; the kind of model decides the route.

mod common;

use base64::Engine;
use common::stack::*;
use common::*;
use serde_json::{Value, json};

/// `POST url` with a JSON body.
async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    answer(response).await
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    (status, body)
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

fn corners(v: &Value) -> [f64; 4] {
    match v {
        Value::Array(a) => [0, 1, 2, 3].map(|i| a[i].as_f64().unwrap()),
        _ => ["x1", "y1", "x2", "y2"].map(|k| v[k].as_f64().unwrap()),
    }
}

/// Every reference detection at score >= 0.25 is in `body` with its label and IoU >= 0.9; returns the smallest
/// IoU seen.
fn check_against_reference(name: &str, how: &str, body: &Value, reference: &Value) -> f64 {
    let expected = &reference[format!("{name}.png")];
    assert_eq!(
        body["image"]["width"], expected["width"],
        "{name} {how}: {body}"
    );
    assert_eq!(
        body["image"]["height"], expected["height"],
        "{name} {how}: {body}"
    );
    let ours = body["detections"].as_array().unwrap();
    let scores: Vec<f64> = ours.iter().map(|d| d["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "{name} {how}: highest score first: {body}"
    );
    let mut worst = 1.0f64;
    for want in expected["detections"].as_array().unwrap() {
        if want["score"].as_f64().unwrap() < 0.25 {
            continue;
        }
        let best = ours
            .iter()
            .filter(|d| d["label"] == want["label"] && d["class_id"] == want["class"])
            .map(|d| iou(corners(&d["box"]), corners(&want["box"])))
            .fold(0.0, f64::max);
        assert!(
            best >= 0.9,
            "{name} {how}: {want} found with IoU {best} at best: {body}"
        );
        worst = worst.min(best);
    }
    worst
}

/// Uploads `png` as `name`.png to `url` in a multipart form, with `fields` before it.
async fn upload(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    png: &[u8],
    fields: &[(&str, &str)],
) -> (u16, Value) {
    let file = format!("{name}.png");
    let mut parts: Vec<(&str, Option<&str>, &[u8])> = fields
        .iter()
        .map(|(field, value)| (*field, None, value.as_bytes()))
        .collect();
    parts.push(("image", Some(&file), png));
    let (content_type, form) = multipart_body(&parts);
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(form)
        .send()
        .await
        .unwrap();
    answer(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_photos_by_url_and_upload_find_the_reference_boxes() {
    let stack = Stack::start().await;
    let (gateway, photos, client) = (&stack.gateway, &stack.photos, &stack.client);
    let detect = format!("{}/detect", gateway.url);
    let reference: Value =
        serde_json::from_slice(&std::fs::read(yolo_testdata().join("detections.json")).unwrap())
            .unwrap();

    for name in YOLO_PHOTOS {
        let url = json!({ "url": format!("{photos}/yolo/{name}.png") });
        let (status, body) = post_json(client, &detect, &url).await;
        assert_eq!(status, 200, "{name} by url: {body}");
        assert_eq!(body["model"]["name"], "yolov3-tiny");
        assert!(body["timings_ms"]["fetch"].as_f64().unwrap() > 0.0);
        assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        let by_url = check_against_reference(name, "by url", &body, &reference);

        let (status, body) = upload(client, &detect, name, &yolo_png(name), &[]).await;
        assert_eq!(status, 200, "{name} uploaded: {body}");
        let uploaded = check_against_reference(name, "uploaded", &body, &reference);
        let found: Vec<String> = body["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                format!(
                    "{} {:.3}",
                    d["label"].as_str().unwrap(),
                    d["score"].as_f64().unwrap()
                )
            })
            .collect();
        println!(
            "{name}: {found:?}; smallest IoU with the reference {by_url:.3} by url, {uploaded:.3} uploaded"
        );
    }

    // base64, and min_score: only what scores at least that, from the model server's own selection.
    let png = yolo_png("camera");
    let image = base64::engine::general_purpose::STANDARD.encode(&png);
    let request = json!({ "image": image, "min_score": 0.45, "model": "yolov3-tiny" });
    let (status, body) = post_json(client, &detect, &request).await;
    assert_eq!(status, 200, "{body}");
    let scores: Vec<f64> = body["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 1, "camera at min_score 0.45: {body}");
    assert!(scores[0] >= 0.45);
    let (status, body) = upload(client, &detect, "camera", &png, &[("min_score", "0.45")]).await;
    assert_eq!(
        (status, body["detections"].as_array().unwrap().len()),
        (200, 1),
        "{body}"
    );

    // The kind of model decides the route, and a wrong request says which route to use.
    let cases = [
        (
            "/predict",
            json!({ "image": image, "model": "yolov3-tiny" }),
            "POST /detect",
        ),
        (
            "/detect",
            json!({ "image": image, "model": "efficientnet-lite0" }),
            "POST /predict",
        ),
        (
            "/detect",
            json!({ "image": image, "top_k": 3 }),
            "min_score",
        ),
        (
            "/predict",
            json!({ "image": image, "min_score": 0.5 }),
            "top_k",
        ),
        (
            "/detect",
            json!({ "image": image, "min_score": 1.5 }),
            "between 0 and 1",
        ),
    ];
    for (path, request, phrase) in cases {
        let (status, body) = post_json(client, &format!("{}{path}", gateway.url), &request).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{path} {request}: {body}");
        assert!(
            message.contains(phrase),
            "{path}: `{message}` lacks `{phrase}`"
        );
    }
    stack.model_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_photos_finds_the_boxes_each_finds_alone() {
    let stack = Stack::start().await;
    let detect = format!("{}/detect", stack.gateway.url);
    // Photos of different sizes in one batch: each box must come back in its own photo's pixels.
    let images: Vec<Value> = YOLO_PHOTOS
        .iter()
        .map(|name| {
            json!({ "image": base64::engine::general_purpose::STANDARD.encode(yolo_png(name)) })
        })
        .collect();
    let (status, batch) = post_json(&stack.client, &detect, &json!({ "images": images })).await;
    assert_eq!(status, 200, "{batch}");
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results.len(), YOLO_PHOTOS.len());
    for (name, (image, batched)) in YOLO_PHOTOS.iter().zip(images.iter().zip(results)) {
        let (status, single) = post_json(&stack.client, &detect, image).await;
        assert_eq!(status, 200, "{name}: {single}");
        assert_eq!(single["image"], batched["image"], "{name}");
        let (alone, together) = (
            single["detections"].as_array().unwrap(),
            batched["detections"].as_array().unwrap(),
        );
        assert_eq!(alone.len(), together.len(), "{name}: {single} vs {batched}");
        for (a, b) in alone.iter().zip(together) {
            assert_eq!(a["label"], b["label"], "{name}");
            let score = (a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs();
            assert!(score <= 1e-4, "{name}: scores {a} vs {b}");
            assert!(
                iou(corners(&a["box"]), corners(&b["box"])) >= 0.999,
                "{name}: {a} vs {b}"
            );
        }
    }
    stack.model_server.stop().await;
}
