//! Interop: the Python `tritonclient.grpc` client, a real third-party Open
//! Inference Protocol client, against the running server.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_gets_metadata_logits_and_labels() {
    let python = python();
    let server = TestServer::start(&[]).await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_interop.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(server.addr.to_string())
        .arg(golden(""))
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "tritonclient script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("tritonclient interop: ok"));
    server.stop().await;
}
