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
