//! Model instances (`--instances`, config.json `instance_group`): answers equal to one instance's, every
//! request counted.

mod common;

use common::*;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::*;

const MODEL: &str = "efficientnet-lite0";

/// One request of these golden photos.
fn photos_request(photos: &[(&str, usize)]) -> ModelInferRequest {
    let pixels: Vec<u8> = photos
        .iter()
        .flat_map(|(name, _)| golden_pixels(name))
        .collect();
    ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![photos.len() as i64, 224, 224, 3],
            ..Default::default()
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        raw_input_contents: vec![pixels],
        ..Default::default()
    }
}

/// The logits of one answer, as their bit patterns so that equality is exact.
fn logit_bits(response: ModelInferResponse) -> Vec<u32> {
    response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The top-1 class of each image of one answer.
fn top1(response: ModelInferResponse) -> Vec<usize> {
    let logits: Vec<f32> = logit_bits(response)
        .into_iter()
        .map(f32::from_bits)
        .collect();
    logits.chunks_exact(1000).map(argmax).collect()
}

/// `(batch size, executions)` of a version's statistics, smallest batch first.
fn batch_counts(stats: &ModelStatistics) -> Vec<(u64, u64)> {
    stats
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, b.compute_infer.map_or(0, |d| d.count)))
        .collect()
}

async fn instance_count(server: &TestServer) -> i32 {
    let config = server
        .client()
        .await
        .model_config(ModelConfigRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config body");
    config.instance_group.iter().map(|g| g.count).sum()
}

async fn statistics(server: &TestServer) -> ModelStatistics {
    server
        .client()
        .await
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner()
        .model_stats
        .remove(0)
}

// Requests of two photos and `--max-batch-size 2`: every execution is exactly one request on either server, so
// the only difference left is the instances, and the logits must not move by a single bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_answer_concurrent_requests_exactly_as_one_does() {
    let pairs = [&PHOTOS[..2], &PHOTOS[2..]];
    let one = TestServer::start(&["--instances", "1", "--max-batch-size", "2"]).await;
    assert_eq!(instance_count(&one).await, 1);
    let mut client = one.client().await;
    let mut expected = Vec::new();
    for pair in pairs {
        let response = client
            .model_infer(photos_request(pair))
            .await
            .expect("infer on one instance");
        expected.push(logit_bits(response.into_inner()));
    }
    one.stop().await;

    let two = TestServer::start(&["--instances", "2", "--max-batch-size", "2"]).await;
    assert_eq!(instance_count(&two).await, 2);
    const REQUESTS: usize = 4;
    let calls: Vec<_> = {
        let channel = two.channel().await;
        (0..REQUESTS)
            .map(|i| {
                let mut client = oip_proto::GrpcInferenceServiceClient::new(channel.clone())
                    .max_decoding_message_size(64 << 20);
                let request = photos_request(pairs[i % 2]);
                tokio::spawn(async move { client.model_infer(request).await })
            })
            .collect()
    };
    for (i, call) in calls.into_iter().enumerate() {
        let response = call.await.expect("task").expect("infer on two instances");
        assert!(
            logit_bits(response.into_inner()) == expected[i % 2],
            "request {i}: logits differ from one instance's"
        );
    }
    let stats = statistics(&two).await;
    assert_eq!(stats.inference_count, 2 * REQUESTS as u64, "{stats:?}");
    assert_eq!(stats.execution_count, REQUESTS as u64, "{stats:?}");
    let success = stats
        .inference_stats
        .and_then(|s| s.success)
        .expect("success");
    assert_eq!(success.count, REQUESTS as u64);
    two.stop().await;
}

// Requests of one to three photos from many connections at once, so batches of several sizes run on both instances
// side by side: each caller gets its own photos' classes back, and the statistics count every request and image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_every_request_of_concurrent_load_on_two_instances() {
    let server = TestServer::start(&["--instances", "2", "--max-batch-size", "4"]).await;
    const REQUESTS: usize = 6;
    let photos: Vec<Vec<(&str, usize)>> = (0..REQUESTS)
        .map(|i| (0..1 + i % 3).map(|j| PHOTOS[(i + j) % 4]).collect())
        .collect();
    let images: usize = photos.iter().map(Vec::len).sum();
    let mut calls = Vec::new();
    for photos in &photos {
        // A connection each, so the calls reach the server together rather than one stream after another.
        let mut client = server.client().await;
        let request = photos_request(photos);
        calls.push(tokio::spawn(
            async move { client.model_infer(request).await },
        ));
    }
    for (i, (call, photos)) in calls.into_iter().zip(&photos).enumerate() {
        let response = call.await.expect("task").expect("infer");
        let expected: Vec<usize> = photos.iter().map(|(_, class)| *class).collect();
        assert_eq!(top1(response.into_inner()), expected, "request {i}");
    }

    let stats = statistics(&server).await;
    assert_eq!(stats.inference_count, images as u64, "{stats:?}");
    let batches = batch_counts(&stats);
    assert_eq!(
        batches.iter().map(|(_, n)| n).sum::<u64>(),
        stats.execution_count,
        "{stats:?}"
    );
    assert_eq!(
        batches.iter().map(|(size, n)| size * n).sum::<u64>(),
        images as u64,
        "{stats:?}"
    );
    assert!(
        batches.iter().all(|(size, _)| (1..=4).contains(size)),
        "{stats:?}"
    );
    let inference = stats.inference_stats.expect("inference stats");
    let count = |d: Option<StatisticDuration>| d.map_or(0, |d| d.count);
    assert_eq!(count(inference.success), REQUESTS as u64);
    assert_eq!(count(inference.queue), REQUESTS as u64);
    assert_eq!(count(inference.fail), 0);
    server.stop().await;
}

// With a queue delay far longer than the calls take to arrive, only full batches run: eight single photos make two
// batches of four, each taken from the one queue by whichever instance is free, never a batch per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_the_batches_the_queue_delay_forms() {
    let server = TestServer::start(&[
        "--instances",
        "2",
        "--max-batch-size",
        "4",
        "--max-queue-delay",
        "1000000",
    ])
    .await;
    let calls: Vec<_> = {
        let client = server.client().await;
        (0..8)
            .map(|i| {
                let mut client = client.clone();
                let photo = PHOTOS[i % 4];
                tokio::spawn(async move {
                    let response = client.model_infer(photos_request(&[photo])).await;
                    (photo.1, response)
                })
            })
            .collect()
    };
    for call in calls {
        let (class, response) = call.await.expect("task");
        assert_eq!(top1(response.expect("infer").into_inner()), [class]);
    }
    let stats = statistics(&server).await;
    assert_eq!(batch_counts(&stats), [(4, 2)], "{stats:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_config_sets_its_own_instance_count() {
    let source = model_repository().join(format!("{MODEL}/1"));
    let repo = std::env::temp_dir().join(format!("instances-repo-{}", std::process::id()));
    let version = repo.join(format!("{MODEL}/1"));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&version).expect("mkdir");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).expect("config"))
            .expect("config json");
    config["instance_group"] = serde_json::json!({ "count": 2 });
    std::fs::write(version.join("config.json"), config.to_string()).expect("write config");
    for file in ["model.safetensors", "labels.txt"] {
        std::fs::copy(source.join(file), version.join(file)).expect("copy");
    }

    let server = TestServer::start_with(&repo, &["--instances", "1"]).await;
    server.wait_ready().await;
    assert_eq!(instance_count(&server).await, 2);
    let response = server
        .client()
        .await
        .model_infer(photos_request(&PHOTOS[..1]))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(top1(response), [PHOTOS[0].1]);
    server.stop().await;
    std::fs::remove_dir_all(&repo).expect("clean up");
}

// The test server runs two inference threads: without `--instances` each version gets one instance per thread, and
// both answer concurrent photos with their own classes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_is_one_instance_per_inference_thread() {
    let server = TestServer::start(&[]).await;
    assert_eq!(instance_count(&server).await, 2);
    let server_ref = &server;
    let calls: Vec<_> = PHOTOS
        .iter()
        .map(|&photo| {
            let request = photos_request(&[photo]);
            async move {
                let server = server_ref;
                let mut client = server.client().await;
                let response = client.model_infer(request).await.expect("infer");
                assert_eq!(top1(response.into_inner()), [photo.1], "{}", photo.0);
            }
        })
        .collect();
    futures::future::join_all(calls).await;
    server.stop().await;
}
