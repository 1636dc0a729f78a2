//! The model-server binary and SIGTERM: health turns NOT_SERVING, new connections are refused, calls
//! in flight complete, and the process exits 0.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::model_repository;
use oip_proto::GrpcInferenceServiceClient;
use oip_proto::inference::model_infer_request::InferInputTensor;
use oip_proto::inference::{ModelInferRequest, ServerReadyRequest};
use tokio::io::{AsyncBufReadExt, BufReader};

fn request() -> ModelInferRequest {
    ModelInferRequest {
        model_name: "efficientnet-lite0".into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![2, 224, 224, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0; 2 * 224 * 224 * 3]],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_calls_in_flight_then_exits_0() {
    let repository = model_repository();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--json-logs",
        ])
        .arg("--model-repository")
        .arg(&repository)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("model-server binary");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("log line") {
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if log["fields"]["message"] == "gRPC server listening" {
                return log["fields"]["addr"].as_str().expect("addr").to_owned();
            }
        }
        panic!("the model server exited before listening");
    })
    .await
    .expect("the model server did not listen in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let client = GrpcInferenceServiceClient::new(channel);
    let started = Instant::now();
    loop {
        let ready = client.clone().server_ready(ServerReadyRequest {}).await;
        if ready.is_ok_and(|r| r.into_inner().ready) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(request()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = server.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    // New connections are refused at once, while the calls are still running.
    let refused_at = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            refused_at.elapsed() < Duration::from_secs(2),
            "still accepting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for call in calls {
        let response = call
            .await
            .expect("task")
            .expect("the call in flight completes");
        assert_eq!(response.into_inner().outputs.len(), 2);
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("exited within the grace period")
        .expect("wait");
    assert!(exit.success(), "exit status {exit}");
}

// Logs that go to a file or a pipe carry no terminal colour codes: a log collector would store them as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_into_a_pipe_have_no_colour_codes() {
    let repository = model_repository();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--model-repository")
        .arg(&repository)
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("model-server binary");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.expect("log line") {
            let listening = line.contains("gRPC server listening");
            seen.push(line);
            if listening {
                return seen;
            }
        }
        panic!("the model server exited before listening: {seen:?}");
    })
    .await
    .expect("the model server did not listen in time");
    assert!(seen.len() > 1, "{seen:?}");
    for line in &seen {
        assert!(!line.contains('\x1b'), "a colour code in {line:?}");
    }
    server.kill().await.expect("kill");
}
