//! Interop: the Python `tritonclient.grpc` client, a real third-party Open
//! Inference Protocol client, against the running server.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Runs `script` (in tests/) against `server` with `data`, and checks it ends with `done`.
async fn run_script(server: &TestServer, script: &str, data: PathBuf, done: &str) {
    let output = tokio::process::Command::new(python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .arg(server.addr.to_string())
        .arg(data)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_gets_metadata_logits_and_labels() {
    let server = TestServer::start(&[]).await;
    let script = "tritonclient_interop.py";
    run_script(&server, script, golden(""), "tritonclient interop: ok").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_gets_the_detectors_boxes_in_the_efficient_nms_layout() {
    let server = TestServer::start_with(&detector_repository(), &[]).await;
    server.wait_ready().await;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/yolo");
    let script = "tritonclient_detection.py";
    run_script(&server, script, data, "tritonclient detection: ok").await;
    server.stop().await;
}

/// Triton's own benchmark tool, perf_analyzer 2.51 (scripts/perf-analyzer.sh installs it), measures both models
/// with random data and no input file, at concurrency 1 and 2, and the server counts no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_analyzer_measures_every_model_with_random_data_and_no_input_file() {
    let server = TestServer::start_with(&detector_repository(), &[]).await;
    server.wait_ready().await;
    let script = workspace().join("scripts/perf-analyzer.sh");
    let url = server.addr.to_string();
    for model in ["efficientnet-lite0", "yolov3-tiny"] {
        // Short windows and a loose stability bound: the test shows the tool works, not how fast it goes.
        let output = tokio::process::Command::new("bash")
            .arg(&script)
            .args([
                "-m",
                model,
                "-u",
                &url,
                "-i",
                "grpc",
                "--concurrency-range",
                "1:2",
            ])
            .args([
                "--measurement-interval",
                "1500",
                "--stability-percentage",
                "100",
                "--max-trials",
                "6",
            ])
            .output()
            .await
            .expect("run perf_analyzer");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{stdout}{stderr}");
        assert!(
            output.status.success(),
            "perf_analyzer on {model} failed:\n{stdout}\n{stderr}"
        );
        for concurrency in [1, 2] {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("Concurrency: {concurrency}, throughput: ")))
                .unwrap_or_else(|| {
                    panic!("{model}: no summary at concurrency {concurrency}:\n{stdout}")
                });
            let throughput: f64 = line
                .split("throughput: ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("{model}: unreadable `{line}`"));
            assert!(throughput > 0.0, "{model}: `{line}`");
        }
        assert!(
            !stdout.to_lowercase().contains("error"),
            "{model}: perf_analyzer reported an error:\n{stdout}"
        );
    }
    let mut client = server.client().await;
    let stats = client
        .model_statistics(oip_proto::inference::ModelStatisticsRequest::default())
        .await
        .expect("statistics")
        .into_inner();
    for m in stats.model_stats {
        let s = m.inference_stats.unwrap_or_default();
        let (ok, failed) = (
            s.success.unwrap_or_default().count,
            s.fail.unwrap_or_default().count,
        );
        assert!(ok > 0, "{}: perf_analyzer sent nothing", m.name);
        assert_eq!(failed, 0, "{}: {failed} requests failed", m.name);
    }
    server.stop().await;
}
