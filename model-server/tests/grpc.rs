//! The model server over gRPC on loopback, called with a tonic client.

mod common;

use common::*;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::*;
use tonic::Code;

const MODEL: &str = "efficientnet-lite0";
/// The classifier again, taking the normalised FP32 input.
const NORMALISED: &str = "efficientnet-lite0-normalised";

fn pixels_request(
    pixels: Vec<u8>,
    batch: i64,
    outputs: Vec<InferRequestedOutputTensor>,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        id: "req-1".into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![batch, 224, 224, 3],
            ..Default::default()
        }],
        outputs,
        raw_input_contents: vec![pixels],
        ..Default::default()
    }
}

fn classification(k: i64) -> InferRequestedOutputTensor {
    InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: [(
            "classification".to_owned(),
            model_server::codec::int64_param(k),
        )]
        .into(),
    }
}

fn output(name: &str) -> InferRequestedOutputTensor {
    InferRequestedOutputTensor {
        name: name.into(),
        ..Default::default()
    }
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Splits a raw BYTES tensor: each element is a u32 LE length, then the bytes.
fn strings(mut raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while raw.len() >= 4 {
        let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        out.push(String::from_utf8(raw[4..4 + len].to_vec()).expect("utf-8"));
        raw = &raw[4 + len..];
    }
    assert!(raw.is_empty(), "trailing bytes in BYTES tensor");
    out
}

fn golden_top5(name: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(golden(&format!("{name}.top5.json"))).expect("top5.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["top5"]
        .as_array()
        .expect("top5 array")
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().expect("index") as usize,
                e["label"].as_str().expect("label").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_sent_as_uint8_get_the_golden_top5() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let labels: Vec<String> = std::fs::read_to_string(golden("imagenet_labels.txt"))
        .expect("labels")
        .lines()
        .map(String::from)
        .collect();
    for (name, top1) in PHOTOS {
        let req = pixels_request(
            golden_pixels(name),
            1,
            vec![classification(5), output("logits")],
        );
        let resp = client.model_infer(req).await.expect("infer").into_inner();
        assert_eq!(
            (
                resp.model_name.as_str(),
                resp.model_version.as_str(),
                resp.id.as_str()
            ),
            (MODEL, "1", "req-1")
        );
        assert_eq!(resp.outputs[0].datatype, "BYTES");
        assert_eq!(resp.outputs[0].shape, [1, 5]);
        let top5: Vec<(usize, String)> = strings(&resp.raw_output_contents[0])
            .iter()
            .map(|s| {
                let mut parts = s.splitn(3, ':');
                let _prob: f32 = parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("probability");
                let index: usize = parts.next().and_then(|p| p.parse().ok()).expect("index");
                (index, parts.next().expect("label").to_owned())
            })
            .collect();
        let expected: Vec<(usize, String)> = golden_top5(name)
            .into_iter()
            .map(|(i, _)| (i, labels[i].clone()))
            .collect();
        assert_eq!(top5, expected, "{name}");
        assert_eq!(top5[0].0, top1);
        let logits = f32s(&resp.raw_output_contents[1]);
        assert_eq!(resp.outputs[1].shape, [1, 1000]);
        let diff = max_abs_diff(&logits, &golden_logits(name));
        assert!(diff < 1e-3, "{name}: logits differ from golden by {diff}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_request_equals_single_requests() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let mut batch = Vec::new();
    let mut singles = Vec::new();
    for (name, _) in PHOTOS {
        let pixels = golden_pixels(name);
        batch.extend_from_slice(&pixels);
        let resp = client
            .model_infer(pixels_request(pixels, 1, vec![output("logits")]))
            .await
            .expect("infer");
        singles.extend(f32s(&resp.into_inner().raw_output_contents[0]));
    }
    let resp = client
        .model_infer(pixels_request(batch, 4, vec![output("logits")]))
        .await
        .expect("batch");
    let resp = resp.into_inner();
    assert_eq!(resp.outputs[0].shape, [4, 1000]);
    let batched = f32s(&resp.raw_output_contents[0]);
    assert!(
        max_abs_diff(&batched, &singles) <= 5e-5,
        "batch differs from single requests"
    );

    server.stop().await;
}

/// The classifier under a second name whose config says `"input_format": "normalised"`: perf_analyzer-style
/// clients see one input per model, and the FP32 tensor answers as the pixels it was made from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normalised_version_takes_fp32_only_and_answers_as_the_pixels_one() {
    let repo = common::lifecycle::Repo::new("layouts");
    repo.add(MODEL, 1);
    repo.add_normalised(NORMALISED, 1);
    let (server, mut client) = common::lifecycle::serve(&repo, &[]).await;
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: NORMALISED.into(),
            version: String::new(),
        })
        .await
        .expect("metadata")
        .into_inner();
    let inputs: Vec<_> = meta
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.clone()))
        .collect();
    assert_eq!(inputs, [("input", "FP32", vec![-1, 3, 224, 224])]);

    let pixels = golden_pixels("chelsea");
    let resp = client
        .model_infer(pixels_request(pixels.clone(), 1, vec![output("logits")]))
        .await
        .expect("infer")
        .into_inner();
    let from_pixels = f32s(&resp.raw_output_contents[0]);
    let fp32 = |model: &str| ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3, 224, 224],
            contents: Some(InferTensorContents {
                fp32_contents: normalise(&pixels),
                ..Default::default()
            }),
            ..Default::default()
        }],
        outputs: vec![output("logits")],
        ..Default::default()
    };
    let resp = client
        .model_infer(fp32(NORMALISED))
        .await
        .expect("fp32 infer")
        .into_inner();
    assert!(
        max_abs_diff(&f32s(&resp.raw_output_contents[0]), &from_pixels) <= 5e-5,
        "FP32 input differs from UINT8"
    );
    let refused = client
        .model_infer(fp32(MODEL))
        .await
        .expect_err("the pixels model has no FP32 input");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("unknown input `input`; this model takes `pixels`"),
        "{}",
        refused.message()
    );
    let mut pixels_to_normalised = pixels_request(pixels, 1, vec![]);
    pixels_to_normalised.model_name = NORMALISED.into();
    let refused = client
        .model_infer(pixels_to_normalised)
        .await
        .expect_err("the normalised model has no pixels input");
    assert!(
        refused
            .message()
            .contains("this model takes `input` (FP32 [N, 3, 224, 224])"),
        "{}",
        refused.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let server = TestServer::start(&["--max-batch-size", "4"]).await;
    let mut client = server.client().await;
    let one = vec![0u8; 224 * 224 * 3];
    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            ModelInferRequest {
                model_name: "resnet-9000".into(),
                ..pixels_request(one.clone(), 1, vec![])
            },
            Code::NotFound,
            "resnet-9000",
        ),
        (
            "unknown version",
            ModelInferRequest {
                model_version: "7".into(),
                ..pixels_request(one.clone(), 1, vec![])
            },
            Code::NotFound,
            "available: 1",
        ),
        (
            "wrong shape",
            {
                let mut r = pixels_request(one.clone(), 1, vec![]);
                r.inputs[0].shape = vec![1, 3, 224, 224];
                r
            },
            Code::InvalidArgument,
            "expected [N, 224, 224, 3]",
        ),
        (
            "wrong datatype",
            {
                let mut r = pixels_request(one.clone(), 1, vec![]);
                r.inputs[0].datatype = "FP16".into();
                r
            },
            Code::InvalidArgument,
            "must be UINT8",
        ),
        (
            "truncated raw bytes",
            pixels_request(one[..1000].to_vec(), 1, vec![]),
            Code::InvalidArgument,
            "150528 bytes",
        ),
        (
            "batch too large",
            pixels_request(vec![0; 5 * 224 * 224 * 3], 5, vec![]),
            Code::InvalidArgument,
            "max_batch_size 4",
        ),
        (
            "raw and typed contents mixed",
            {
                let mut r = pixels_request(one.clone(), 1, vec![]);
                r.inputs[0].contents = Some(InferTensorContents {
                    uint_contents: vec![0; 3],
                    ..Default::default()
                });
                r
            },
            Code::InvalidArgument,
            "mutually exclusive",
        ),
        (
            "unknown output",
            pixels_request(one.clone(), 1, vec![output("embeddings")]),
            Code::InvalidArgument,
            "unknown output",
        ),
        (
            "classification k out of range",
            pixels_request(one.clone(), 1, vec![classification(0)]),
            Code::InvalidArgument,
            "from 1 to 1000",
        ),
    ];
    for (what, req, code, text) in cases {
        let status = client.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(
            status.message().contains(text),
            "{what}: message `{}` lacks `{text}`",
            status.message()
        );
    }
    let status = client
        .model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .expect_err("metadata of unknown model");
    assert_eq!(status.code(), Code::NotFound);

    let resp = client
        .model_infer(pixels_request(
            golden_pixels("coffee"),
            1,
            vec![output("logits")],
        ))
        .await;
    assert_eq!(
        argmax(&f32s(
            &resp
                .expect("still serving")
                .into_inner()
                .raw_output_contents[0]
        )),
        967
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_config_statistics_and_index_describe_the_model() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    let inputs: Vec<_> = meta
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.clone()))
        .collect();
    assert_eq!(inputs, [("pixels", "UINT8", vec![-1, 224, 224, 3])]);
    let outputs: Vec<_> = meta
        .outputs
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("logits", vec![-1, 1000]),
            ("probabilities", vec![-1, 1000])
        ]
    );

    let config = client
        .model_config(ModelConfigRequest {
            name: MODEL.into(),
            version: "1".into(),
        })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config body");
    assert_eq!(
        (config.max_batch_size, config.input[0].dims.clone()),
        (8, vec![224, 224, 3])
    );

    let server_meta = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("server meta")
        .into_inner();
    assert!(server_meta.extensions.contains(&"statistics".to_owned()));

    let before = client
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("stats")
        .into_inner()
        .model_stats[0]
        .inference_count;
    client
        .model_infer(pixels_request(vec![0; 2 * 224 * 224 * 3], 2, vec![]))
        .await
        .expect("infer");
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: "1".into(),
        })
        .await
        .expect("stats")
        .into_inner()
        .model_stats;
    assert_eq!(stats[0].inference_count, before + 2);
    assert!(stats[0].batch_stats.iter().any(|b| b.batch_size == 2));

    let index = client
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .expect("index")
        .into_inner();
    // The classifier, and the detector where the repository has it.
    let entry = index
        .models
        .iter()
        .find(|m| m.name == MODEL)
        .expect("the classifier is listed");
    assert_eq!(entry.state, "READY");
    assert!(
        index
            .models
            .iter()
            .all(|m| [MODEL, "yolov3-tiny"].contains(&m.name.as_str())),
        "{:?}",
        index.models
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_only_when_every_model_loaded() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let server = TestServer::start(&[]).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health");
        assert_eq!(
            status.into_inner().status(),
            ServingStatus::Serving,
            "service `{service}`"
        );
    }
    server.stop().await;

    // A repository whose only model cannot load: the server runs, says why,
    // and never reports SERVING.
    let repo = std::env::temp_dir().join(format!("broken-repo-{}", std::process::id()));
    let version = repo.join("broken/1");
    std::fs::create_dir_all(&version).expect("mkdir");
    let config =
        std::fs::read_to_string(model_repository().join("efficientnet-lite0/1/config.json"))
            .expect("cfg");
    std::fs::write(version.join("config.json"), config).expect("write config");
    let server = TestServer::start_with(&repo, &[]).await;
    let channel = server.channel().await;
    let mut client = oip_proto::GrpcInferenceServiceClient::new(channel.clone());
    let mut state = String::new();
    for _ in 0..100 {
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await
            .expect("index")
            .into_inner();
        // The index is empty until the start-up load has taken the model up.
        let Some(model) = index.models.first() else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        state = model.state.clone();
        if state == "UNAVAILABLE" {
            assert!(
                model.reason.contains("model.safetensors"),
                "reason: {}",
                model.reason
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, "UNAVAILABLE");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert_eq!(
        status.expect("health").into_inner().status(),
        ServingStatus::NotServing
    );
    let err = ModelInferRequest {
        model_name: "broken".into(),
        ..pixels_request(vec![0; 224 * 224 * 3], 1, vec![])
    };
    let status = client
        .model_infer(err)
        .await
        .expect_err("broken model must not serve");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    server.stop().await;
    let _ = std::fs::remove_dir_all(repo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_resource_exhausted_and_others_complete() {
    let server = TestServer::start(&["--max-queue-size", "1", "--max-batch-size", "8"]).await;
    let client = server.client().await;
    let requests = (0..24).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.model_infer(pixels_request(vec![0; 8 * 224 * 224 * 3], 8, vec![]))
                .await
        })
    });
    let mut ok = 0;
    let mut exhausted = 0;
    for r in futures::future::join_all(requests).await {
        match r.expect("task") {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("queue"), "{}", s.message());
                exhausted += 1;
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, refused {exhausted}");
    assert_eq!(ok + exhausted, 24);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_inference_and_health_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(&[]).await;
    let channel = server.channel().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!(
            "unexpected reflection response {:?}",
            response.message_response
        );
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_whose_deadline_passes_is_dropped_without_running() {
    let server = TestServer::start(&["--max-batch-size", "8"]).await;
    let client = server.client().await;
    const BUSY: usize = 5;
    let busy: Vec<_> = (0..BUSY)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.model_infer(pixels_request(vec![0; 8 * 224 * 224 * 3], 8, vec![]))
                    .await
            })
        })
        .collect();
    // The late call must queue behind full batches, not slip in ahead of eight-image
    // requests still on the wire: wait until two of them are queued behind the running one.
    // Two batches of eight take longer than the late call's deadline on any machine
    // that takes more than 15 ms per batch.
    let pending = format!("nv_inference_pending_request_count{{model=\"{MODEL}\"");
    let waited = std::time::Instant::now();
    while common::lifecycle::metric(server.http_addr, &pending)
        .await
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(30),
            "two of the busy calls never queued at once"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut late = tonic::Request::new(pixels_request(vec![0; 224 * 224 * 3], 1, vec![]));
    late.set_timeout(std::time::Duration::from_millis(30));
    let status = client
        .clone()
        .model_infer(late)
        .await
        .expect_err("the deadline passes while the call waits in the queue");
    // tonic's server enforces grpc-timeout itself and answers CANCELLED "Timeout expired".
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    for call in busy {
        call.await.expect("task").expect("the busy calls complete");
    }

    let stats = client
        .clone()
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    // Only the busy images ran: the late call was dropped when the batcher reached it.
    assert_eq!(
        stats.model_stats[0].inference_count,
        8 * BUSY as u64,
        "{stats:?}"
    );
    assert_eq!(
        stats.model_stats[0].execution_count, BUSY as u64,
        "{stats:?}"
    );
    server.stop().await;
}

/// Batch-size counts of the model's statistics: `(batch size, executions)`.
async fn batch_counts(
    client: &mut oip_proto::GrpcInferenceServiceClient<tonic::transport::Channel>,
) -> Vec<(u64, u64)> {
    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    let mut counts: Vec<(u64, u64)> = stats.model_stats[0]
        .batch_stats
        .iter()
        .map(|b| {
            (
                b.batch_size,
                b.compute_infer.as_ref().map_or(0, |d| d.count),
            )
        })
        .collect();
    counts.sort();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_within_the_queue_delay_run_as_one_batch_with_unbatched_results() {
    // One second is far longer than four concurrent calls take to arrive, and a full batch does not wait for it.
    let server =
        TestServer::start(&["--max-batch-size", "4", "--max-queue-delay", "1000000"]).await;
    let client = server.client().await;
    let calls = PHOTOS.iter().map(|(name, _)| {
        let mut c = client.clone();
        let pixels = golden_pixels(name);
        tokio::spawn(async move {
            let response = c
                .model_infer(pixels_request(pixels, 1, vec![output("logits")]))
                .await
                .expect("batched call")
                .into_inner();
            f32s(&response.raw_output_contents[0])
        })
    });
    let batched: Vec<Vec<f32>> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let mut client = client.clone();
    assert_eq!(
        batch_counts(&mut client).await,
        [(4, 1)],
        "the four calls were not one batch"
    );

    // The same photos one at a time: each runs alone once its delay is over.
    for ((name, _), batched) in PHOTOS.iter().zip(&batched) {
        let single = client
            .model_infer(pixels_request(
                golden_pixels(name),
                1,
                vec![output("logits")],
            ))
            .await
            .expect("single call")
            .into_inner();
        let single = f32s(&single.raw_output_contents[0]);
        assert!(
            max_abs_diff(&single, batched) <= 5e-5,
            "{name}: batched result differs from the unbatched one"
        );
    }
    assert_eq!(batch_counts(&mut client).await, [(1, 4), (4, 1)]);
    server.stop().await;
}
