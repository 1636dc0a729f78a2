//! Real model server + real gateway on loopback: the golden photos by URL, base64 and upload give the
//! golden top-1 class; `/test` answers; `/readyz` follows the model server going away and coming back.

mod common;

use std::time::Duration;

use base64::Engine;
use common::stack::*;
use common::*;
use serde_json::{Value, json};

fn top1(body: &Value) -> (i64, String) {
    let first = &body["predictions"][0];
    (
        first["index"].as_i64().unwrap_or(-1),
        first["label"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn answer(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// `GET /test`: the gateway's bundled sample image.
async fn get_test(client: &reqwest::Client, gateway: &str) -> Value {
    answer(client.get(format!("{gateway}/test")).send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_photos_by_url_base64_and_upload() {
    let stack = Stack::start().await;
    let (gateway, photos, client) = (&stack.gateway, &stack.photos, &stack.client);

    for (name, index, label) in PHOTOS {
        let by_url = stack
            .predict(json!({ "url": format!("{photos}/{name}.png") }))
            .await;
        let body = answer(by_url).await;
        println!("{name} by url: {}", body["predictions"][0]);
        assert_eq!(
            top1(&body),
            (index, label.to_owned()),
            "{name} by url: {body}"
        );
        assert!(body["timings_ms"]["fetch"].as_f64().unwrap() > 0.0);

        let png = golden_png(name);
        let base64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let by_base64 = client
            .post(format!("{}/predict", gateway.url))
            .header("content-type", "application/json")
            .body(json!({ "image": base64, "top_k": 3 }).to_string())
            .send()
            .await
            .unwrap();
        let body = answer(by_base64).await;
        assert_eq!(top1(&body).0, index, "{name} by base64: {body}");
        assert_eq!(body["predictions"].as_array().unwrap().len(), 3);

        let boundary = "e2e-boundary";
        let mut form = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .into_bytes();
        form.extend_from_slice(&png);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let uploaded = client
            .post(format!("{}/predict", gateway.url))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form)
            .send()
            .await
            .unwrap();
        let body = answer(uploaded).await;
        assert_eq!(top1(&body).0, index, "{name} uploaded: {body}");
        assert_eq!(body["model"]["name"], "efficientnet-lite0");
    }

    let body = get_test(client, &gateway.url).await;
    assert_eq!(top1(&body), (967, "espresso".to_owned()), "/test: {body}");

    // Unknown model: the model server's NOT_FOUND becomes 404.
    let response = client
        .post(format!("{}/predict", gateway.url))
        .header("content-type", "application/json")
        .body(
            json!({ "url": format!("{photos}/coffee.png"), "model": "no-such-model" }).to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    let metrics = client
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"gateway_phase_duration_seconds_count{phase="inference"}"#));
    stack.model_server.stop().await;
}

/// Classes and probabilities of an answer, highest first.
fn classes(body: &Value) -> Vec<(i64, f64)> {
    body["predictions"]
        .as_array()
        .unwrap_or_else(|| panic!("no predictions in {body}"))
        .iter()
        .map(|p| {
            (
                p["index"].as_i64().unwrap_or(-1),
                p["probability"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_as_single_requests_even_above_the_models_max_batch_size() {
    let stack = Stack::start().await;
    // Each golden photo twice: by URL and as base64.
    let mut images = Vec::new();
    for (name, _, _) in PHOTOS {
        images.push(json!({ "url": format!("{}/{name}.png", stack.photos) }));
        let png = golden_png(name);
        images.push(json!({ "image": base64::engine::general_purpose::STANDARD.encode(&png) }));
    }
    let mut singles = Vec::new();
    for image in &images {
        singles.push(answer(stack.predict(image.clone()).await).await);
    }
    let batch = answer(stack.predict(json!({ "images": images })).await).await;
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results.len(), 8);
    for (i, (single, batched)) in singles.iter().zip(results).enumerate() {
        let (single, batched) = (classes(single), classes(batched));
        let indices = |c: &[(i64, f64)]| c.iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_eq!(indices(&single), indices(&batched), "image {i}");
        // The server prints probabilities to 6 decimals; a batch may sum in another order than one image.
        for ((_, a), (_, b)) in single.iter().zip(&batched) {
            assert!(
                (a - b).abs() <= 1e-4,
                "image {i}: {a} alone, {b} in the batch"
            );
        }
        assert_eq!(indices(&batched)[0], PHOTOS[i / 2].1, "image {i}");
    }
    // Twelve images, above the model server's max_batch_size of 8: the gateway sends them as two calls and
    // still answers in order.
    let twelve: Vec<_> = images.iter().chain(&images[..4]).cloned().collect();
    let batch = answer(stack.predict(json!({ "images": twelve })).await).await;
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results.len(), 12, "{batch}");
    for (i, result) in results.iter().enumerate() {
        let top = classes(result).first().map(|(index, _)| *index);
        assert_eq!(top, Some(PHOTOS[(i % 8) / 2].1), "image {i}: {result}");
    }
    stack.model_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_model_server() {
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = model_server.addr;
    let gateway = Gateway::start(addr).await;
    let client = http_client();
    wait_for_readyz(&client, &gateway.url, 200, Duration::from_secs(300)).await;

    model_server.stop().await;
    wait_for_readyz(&client, &gateway.url, 503, Duration::from_secs(30)).await;
    let response = client
        .get(format!("{}/test", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "predicting with the model server down"
    );

    let model_server = ModelServer::start(addr).await;
    wait_for_readyz(&client, &gateway.url, 200, Duration::from_secs(300)).await;
    let body = get_test(&client, &gateway.url).await;
    assert_eq!(top1(&body).0, 967);
    model_server.stop().await;
}
