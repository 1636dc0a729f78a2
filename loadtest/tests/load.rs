//! loadtest against servers started inside the test on loopback: exact counts, error kinds, the open loop's
//! coordinated-omission correction, the folder server, the gRPC request it builds, and the JSON report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use loadtest::cli::Cli;
use loadtest::report::Report;
use oip_proto::inference::model_infer_response::InferOutputTensor;
use oip_proto::inference::model_metadata_response::TensorMetadata;
use oip_proto::inference::*;
use oip_proto::{GrpcInferenceService, GrpcInferenceServiceServer};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Http {
    hits: AtomicU64,
    /// Held while answering, so the server answers one request at a time.
    one_at_a_time: Mutex<()>,
}

/// `/test` answers like a gateway, every fifth request with 503; `/slow` answers one request at a time, 20 ms
/// each; `/predict` echoes the body's length in a gateway-shaped answer.
async fn http_server() -> (SocketAddr, Arc<Http>) {
    let state = Arc::new(Http::default());
    async fn test(State(s): State<Arc<Http>>) -> (StatusCode, String) {
        let n = s.hits.fetch_add(1, Ordering::SeqCst);
        if n % 5 == 4 {
            return (StatusCode::SERVICE_UNAVAILABLE, "busy".into());
        }
        let body = r#"{"predictions":[],"timings_ms":{"fetch":0.0,"decode":1.0,"preprocess":2.0,"inference":7.0,"total":11.0}}"#;
        (StatusCode::OK, body.into())
    }
    async fn slow(State(s): State<Arc<Http>>) -> &'static str {
        let _one = s.one_at_a_time.lock().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.hits.fetch_add(1, Ordering::SeqCst);
        "ok"
    }
    async fn predict(State(s): State<Arc<Http>>, body: axum::body::Bytes) -> (StatusCode, String) {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let text = String::from_utf8_lossy(&body);
        // Checks what arrived: a JSON URL body or a multipart upload with the file's bytes.
        let ok = text.starts_with("{\"url\":\"http://") || text.contains("name=\"image\"");
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        (
            status,
            format!(r#"{{"timings_ms":{{"total":{}.0}}}}"#, body.len()),
        )
    }
    let app = Router::new()
        .route("/test", get(test))
        .route("/slow/test", get(slow))
        .route("/predict", post(predict))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, state)
}

async fn run(args: &[&str]) -> Report {
    let cli = Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
        .expect("arguments");
    loadtest::execute(cli.command).await.expect("run").0
}

#[tokio::test]
async fn closed_loop_sends_exactly_the_requests_asked_and_sorts_errors() {
    let (addr, server) = http_server().await;
    let gateway = format!("http://{addr}");
    let report = run(&[
        "test",
        "--gateway",
        &gateway,
        "-c",
        "4",
        "--requests",
        "50",
        "-t",
        "60s",
    ])
    .await;
    assert_eq!(report.transactions, 50, "{report}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 50);
    assert_eq!((report.successful, report.failed), (40, 10), "{report}");
    assert_eq!(report.errors.get("http_503"), Some(&10), "{report}");
    assert!((report.availability_pct - 80.0).abs() < 1e-9);
    let inference = &report.server_timings_ms["inference"];
    assert!((inference.p50 - 7.0).abs() < 0.01, "{inference:?}");
    assert!((report.server_timings_ms["total"].p99 - 11.0).abs() < 0.02);
}

#[tokio::test]
async fn warm_up_requests_are_sent_but_not_reported() {
    let (addr, server) = http_server().await;
    let gateway = format!("http://{addr}");
    let report = run(&[
        "test",
        "--gateway",
        &gateway,
        "-c",
        "1",
        "--warmup",
        "300ms",
        "--requests",
        "5",
    ])
    .await;
    assert_eq!(report.transactions, 5, "{report}");
    assert!(
        server.hits.load(Ordering::SeqCst) > 5,
        "warm-up sent nothing"
    );
}

#[tokio::test]
async fn open_loop_counts_queueing_from_the_scheduled_send_time() {
    // 100 requests a second against a server that answers 50: the backlog grows for the whole second, and each
    // request's latency includes the time it waited behind it. Timed from the actual send, every request would
    // take about 20 ms.
    let (addr, _) = http_server().await;
    let gateway = format!("http://{addr}/slow");
    let report = run(&[
        "test",
        "--gateway",
        &gateway,
        "--rate",
        "100/s",
        "-c",
        "200",
        "-t",
        "1s",
    ])
    .await;
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.transactions >= 90, "{report}");
    let l = &report.latency_ms;
    assert!(l.p99 >= 10.0 * 20.0, "the queue is hidden: {l:?}");
    assert!(
        l.max >= 10.0 * l.min,
        "latency did not grow along the backlog: {l:?}"
    );
    // The run lasts until the last answer, so throughput is what the server managed, not the offered rate.
    assert!(report.throughput_rps < 80.0, "{report}");
}

#[tokio::test]
async fn predict_by_url_serves_the_folder_it_is_given() {
    let dir = tempdir();
    std::fs::write(dir.join("a.jpg"), b"not really a jpeg").expect("write");
    std::fs::write(dir.join("b.png"), b"png bytes").expect("write");
    std::fs::write(dir.join("notes.txt"), b"skipped").expect("write");
    // The folder server itself.
    let folder = loadtest::serve::Folder::load(&dir).expect("folder");
    assert_eq!(folder.names(), ["a.jpg", "b.png"]);
    let (served, _task) = folder
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let body = reqwest::get(format!("http://{served}/b.png"))
        .await
        .expect("get");
    assert_eq!(body.headers()["content-type"], "image/png");
    assert_eq!(body.bytes().await.expect("bytes").as_ref(), b"png bytes");
    let missing = reqwest::get(format!("http://{served}/nope.jpg"))
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    // Through the predict-url target.
    let (addr, server) = http_server().await;
    let gateway = format!("http://{addr}");
    let dir_arg = dir.to_string_lossy().into_owned();
    let report = run(&[
        "predict-url",
        "--gateway",
        &gateway,
        "--serve-dir",
        &dir_arg,
        "--requests",
        "6",
    ])
    .await;
    assert_eq!((report.successful, report.failed), (6, 0), "{report}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 6);
    let upload = run(&[
        "predict-upload",
        "--gateway",
        &gateway,
        "--images",
        &dir_arg,
        "--requests",
        "4",
    ])
    .await;
    assert_eq!((upload.successful, upload.failed), (4, 0), "{upload}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn an_empty_folder_is_refused_before_any_load() {
    let dir = tempdir();
    let cli = Cli::try_parse_from([
        "loadtest",
        "predict-upload",
        "--images",
        &dir.to_string_lossy(),
    ])
    .expect("args");
    let err = loadtest::execute(cli.command)
        .await
        .expect_err("empty folder");
    assert!(err.to_string().contains("no image files"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir() -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loadtest-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Model metadata and ModelInfer only; checks every request's tensor against the metadata it gave.
#[derive(Default)]
struct Counts {
    good: AtomicU64,
    bad: AtomicU64,
}

#[derive(Clone, Default)]
struct Oip(Arc<Counts>);

fn meta(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Oip {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn model_ready(
        &self,
        _: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Ok(Response::new(ModelMetadataResponse {
            name: request.into_inner().name,
            versions: vec!["3".into()],
            platform: "test".into(),
            inputs: vec![
                meta("normalised", "FP32", &[-1, 3, 24, 32]),
                meta("rgb", "UINT8", &[-1, 24, 32, 3]),
            ],
            outputs: vec![meta("scores", "FP32", &[-1, 10])],
        }))
    }
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let r = request.into_inner();
        let input = &r.inputs[0];
        let batch = input.shape.first().copied().unwrap_or(0);
        let top_k = r
            .outputs
            .first()
            .and_then(|o| o.parameters.get("classification"))
            .and_then(|p| match p.parameter_choice {
                Some(infer_parameter::ParameterChoice::Int64Param(k)) => Some(k),
                _ => None,
            });
        let right = input.name == "rgb"
            && input.datatype == "UINT8"
            && input.shape[1..] == [24, 32, 3]
            && r.raw_input_contents.len() == 1
            && r.raw_input_contents[0].len() as i64 == batch * 24 * 32 * 3
            // A real picture, resized: not all one value.
            && r.raw_input_contents[0].iter().any(|&b| b != r.raw_input_contents[0][0])
            && r.outputs[0].name == "scores"
            && top_k == Some(5);
        if !right {
            self.0.bad.fetch_add(1, Ordering::SeqCst);
            return Err(Status::invalid_argument("unexpected request"));
        }
        self.0.good.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ModelInferResponse {
            model_name: r.model_name,
            model_version: "3".into(),
            id: r.id,
            parameters: HashMap::new(),
            outputs: vec![InferOutputTensor {
                name: "scores".into(),
                datatype: "BYTES".into(),
                shape: vec![batch, 5],
                parameters: HashMap::new(),
                contents: None,
            }],
            raw_output_contents: vec![vec![0; 8]],
        }))
    }
    async fn model_config(
        &self,
        _: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

#[tokio::test]
async fn grpc_target_sends_a_resized_image_shaped_as_the_model_says() {
    let oip = Oip::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = GrpcInferenceServiceServer::new(oip.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let image = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/golden/chelsea.png"
    );
    let server = format!("http://{addr}");
    let report = run(&[
        "grpc",
        "--server",
        &server,
        "--model",
        "m",
        "--image",
        image,
        "--batch",
        "3",
        "--requests",
        "12",
    ])
    .await;
    assert_eq!((report.successful, report.failed), (12, 0), "{report}");
    assert_eq!(oip.0.good.load(Ordering::SeqCst), 12);
    assert_eq!(oip.0.bad.load(Ordering::SeqCst), 0);
    // Nothing listens here: a clear set-up error, not a report full of transport errors.
    let cli = Cli::try_parse_from([
        "loadtest",
        "grpc",
        "--server",
        "http://127.0.0.1:1",
        "--image",
        image,
    ])
    .expect("args");
    let err = loadtest::execute(cli.command).await.expect_err("no server");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn json_report_has_the_documented_fields() {
    let (addr, _) = http_server().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "test",
            "--gateway",
            &format!("http://{addr}"),
            "--requests",
            "10",
            "-c",
            "2",
            "--json",
        ])
        .output()
        .await
        .expect("run loadtest");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    for field in [
        "target",
        "concurrency",
        "transactions",
        "successful",
        "failed",
        "availability_pct",
        "elapsed_s",
        "throughput_rps",
        "bytes_received",
        "mean_in_flight",
        "latency_ms",
        "errors",
        "server_timings_ms",
    ] {
        assert!(json.get(field).is_some(), "no {field} in {json}");
    }
    assert_eq!(json["transactions"], 10);
    assert_eq!(json["errors"]["http_503"], 2);
    for p in ["min", "mean", "p50", "p90", "p99", "p999", "max"] {
        assert!(
            json["latency_ms"][p].as_f64().is_some(),
            "no latency_ms.{p} in {json}"
        );
    }
}
