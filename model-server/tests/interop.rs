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
