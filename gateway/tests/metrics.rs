//! `/metrics` of both tiers: a few predictions move every counter and histogram by exactly what they did, and
//! both scrapes parse as the Prometheus text format. The model server's KServe v2 health endpoints answer.

mod common;

use common::prom::{self, Scrape};
use common::stack::*;
use oip_proto::inference::model_infer_request::InferInputTensor;
use oip_proto::inference::{InferTensorContents, ModelInferRequest};
use serde_json::json;

const MODEL: &str = "efficientnet-lite0";

async fn scrape(client: &reqwest::Client, url: &str) -> Scrape {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    prom::parse(&text).unwrap_or_else(|e| panic!("{url} is not Prometheus text: {e}\n{text}"))
}

/// `after - before` of one sample; labelled counters that never moved count as 0.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value_or_zero(name, labels) - before.value_or_zero(name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_move_both_tiers_metrics_by_exactly_what_they_did() {
    let stack = Stack::start().await;
    let (gateway, photos, client) = (&stack.gateway, &stack.photos, &stack.client);
    let ms_http = format!("http://{}", stack.model_server.http_addr);
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let status = client
            .get(format!("{ms_http}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }

    let gw_metrics = format!("{}/metrics", gateway.url);
    let ms_metrics = format!("{ms_http}/metrics");
    let gw_before = scrape(client, &gw_metrics).await;
    let ms_before = scrape(client, &ms_metrics).await;

    // Three predictions by URL, one after another, so each runs as a batch of one.
    let names = ["chelsea", "coffee", "rocket"];
    let mut fetched = 0;
    for name in names {
        let response = stack
            .predict(json!({ "url": format!("{photos}/{name}.png") }))
            .await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        fetched += common::golden_png(name).len();
    }
    // One the gateway refuses before fetching, and one the model server refuses (a wrong shape).
    let refused = stack
        .predict(json!({ "url": format!("{photos}/chelsea.png"), "top_k": 0 }))
        .await;
    assert_eq!(refused.status(), 400);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", stack.model_server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let wrong_shape = ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 2, 2, 3],
            contents: Some(InferTensorContents {
                uint_contents: vec![0; 12],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = oip_proto::GrpcInferenceServiceClient::new(channel)
        .model_infer(wrong_shape)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let gw = scrape(client, &gw_metrics).await;
    let ms = scrape(client, &ms_metrics).await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&gw_before, &gw, name, labels);
    let route = ("route", "/predict");
    assert_eq!(
        d("gateway_requests_total", &[route, ("status", "200")]),
        3.0
    );
    assert_eq!(
        d("gateway_requests_total", &[route, ("status", "400")]),
        1.0
    );
    assert_eq!(d("gateway_request_duration_seconds_count", &[route]), 4.0);
    for phase in ["fetch", "decode", "preprocess", "inference", "total"] {
        assert_eq!(
            d("gateway_phase_duration_seconds_count", &[("phase", phase)]),
            3.0,
            "{phase}"
        );
        assert!(
            d("gateway_phase_duration_seconds_sum", &[("phase", phase)]) > 0.0,
            "{phase}"
        );
    }
    assert_eq!(d("gateway_fetch_bytes_total", &[]), fetched as f64);
    assert_eq!(d("gateway_requests_shed_total", &[]), 0.0);
    // The scrape itself is the one request in flight.
    assert_eq!(gw.value("gateway_requests_in_flight", &[]), 1.0);
    assert_eq!(gw.value("gateway_images_in_flight", &[]), 0.0);
    assert_eq!(
        gw.value("gateway_upstream_endpoints", &[("state", "known")]),
        1.0
    );
    assert_eq!(
        gw.value("gateway_upstream_endpoints", &[("state", "ejected")]),
        0.0
    );
    assert_eq!(d("gateway_upstream_retries_total", &[]), 0.0);
    assert!(
        !gw.samples
            .iter()
            .any(|s| s.name == "gateway_upstream_errors_total"),
        "no call failed"
    );

    let d = |name: &str, labels: &[(&str, &str)]| delta(&ms_before, &ms, name, labels);
    let m = [("model", MODEL), ("version", "1")];
    assert_eq!(d("nv_inference_request_success", &m), 3.0);
    assert_eq!(d("nv_inference_count", &m), 3.0);
    assert_eq!(d("nv_inference_exec_count", &m), 3.0);
    let invalid = [m[0], m[1], ("reason", "invalid_argument")];
    assert_eq!(d("nv_inference_request_failure", &invalid), 1.0);
    for reason in ["rejected", "cancelled", "backend"] {
        assert_eq!(
            d(
                "nv_inference_request_failure",
                &[m[0], m[1], ("reason", reason)]
            ),
            0.0
        );
    }
    for histogram in ["queue", "compute", "request"] {
        let name = format!("nv_inference_{histogram}_duration_seconds_count");
        assert_eq!(d(&name, &m), 3.0, "{name}");
    }
    // Three batches of one image: all in the first bucket, and they sum to 3.
    assert_eq!(d("nv_inference_batch_size_count", &m), 3.0);
    assert_eq!(d("nv_inference_batch_size_sum", &m), 3.0);
    assert_eq!(
        d("nv_inference_batch_size_bucket", &[m[0], m[1], ("le", "1")]),
        3.0
    );
    // The cumulative microsecond counters agree with the histograms' sums.
    let request_us = d("nv_inference_request_duration_us", &m);
    let request_s = d("nv_inference_request_duration_seconds_sum", &m);
    assert!(
        (request_us / 1e6 - request_s).abs() < 1e-3,
        "{request_us} us vs {request_s} s"
    );
    assert!(d("nv_inference_compute_infer_duration_us", &m) > 0.0);
    assert_eq!(ms.value("nv_inference_pending_request_count", &m), 0.0);
    assert_eq!(ms.value("nv_model_loaded", &m), 1.0);
    assert!(ms.value("process_resident_memory_bytes", &[]) > 0.0);
    stack.model_server.stop().await;
}
/// The reader above is strict enough to catch what a scraper would refuse.
#[test]
fn the_reader_refuses_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"2\"} 3\n";
    assert_eq!(
        prom::parse(good)
            .unwrap()
            .value("a_total", &[("x", "1\"2")]),
        3.0
    );
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na{x=\"1\"\n",
        "# TYPE a counter\na one\n",
        "# TYPE 1a counter\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\nh_sum 0\n",
    ] {
        assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
    }
}
