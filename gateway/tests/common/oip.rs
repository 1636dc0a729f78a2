//! A fast fake model tier over real gRPC: answers ModelInfer after a fixed delay with a made-up class,
//! counts what it served in ModelStatistics. Runs as a task in the test, or as a child process the test
//! can SIGKILL (the test binary started again; see `replicas.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use oip_proto::inference::model_infer_response::InferOutputTensor;
use oip_proto::inference::model_metadata_response::TensorMetadata;
use oip_proto::inference::*;
use oip_proto::{GrpcInferenceService, GrpcInferenceServiceClient, GrpcInferenceServiceServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// The fake's counters.
#[derive(Default)]
pub struct Counters {
    /// ModelInfer calls answered.
    pub served: AtomicU64,
    /// ModelInfer calls being answered now.
    pub in_flight: AtomicUsize,
}

#[derive(Clone)]
struct Fake {
    latency: Duration,
    counters: Arc<Counters>,
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Fake {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }
    async fn model_ready(
        &self,
        _: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: true }))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        Ok(Response::new(ModelMetadataResponse {
            name: request.into_inner().name,
            versions: vec!["1".into()],
            platform: "fake".into(),
            inputs: vec![tensor("pixels", "UINT8", &[-1, 224, 224, 3])],
            outputs: vec![tensor("probabilities", "FP32", &[-1, 1000])],
        }))
    }
    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        self.counters.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(self.counters.clone());
        let request = request.into_inner();
        tokio::time::sleep(self.latency).await;
        let class = b"0.9:967:espresso";
        let mut raw = (class.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(class);
        self.counters.served.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ModelInferResponse {
            model_name: request.model_name,
            model_version: "1".into(),
            id: request.id,
            parameters: HashMap::new(),
            outputs: vec![InferOutputTensor {
                name: "probabilities".into(),
                datatype: "BYTES".into(),
                shape: vec![1, 1],
                parameters: HashMap::new(),
                contents: None,
            }],
            raw_output_contents: vec![raw],
        }))
    }
    async fn model_config(
        &self,
        _: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: vec![ModelStatistics {
                name: request.into_inner().name,
                version: "1".into(),
                inference_count: self.counters.served.load(Ordering::SeqCst),
                ..Default::default()
            }],
        }))
    }
    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A fake model server running as a task of the test.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeServer {
    /// Serves on `addr` (port 0 for any) answering each inference after `latency`.
    pub async fn start(addr: &str, latency: Duration) -> FakeServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (addr, counters, stop) = serve(listener, latency);
        FakeServer {
            addr,
            counters,
            stop: Some(stop),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the fake on `listener` until the returned sender fires or is dropped.
pub fn serve(
    listener: tokio::net::TcpListener,
    latency: Duration,
) -> (SocketAddr, Arc<Counters>, oneshot::Sender<()>) {
    let addr = listener.local_addr().unwrap();
    let counters = Arc::new(Counters::default());
    let fake = Fake {
        latency,
        counters: counters.clone(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(fake))
            .serve_with_incoming_shutdown(tokio_stream_listener(listener), async move {
                let _ = stopped.await;
            }),
    );
    (addr, counters, stop)
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// ModelInfer calls a server has answered, read from its ModelStatistics.
pub async fn served(addr: SocketAddr) -> u64 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stats = GrpcInferenceServiceClient::new(channel)
        .model_statistics(ModelStatisticsRequest {
            name: "efficientnet-lite0".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    stats.model_stats.iter().map(|s| s.inference_count).sum()
}

/// Environment variable telling the test binary, started again, to be a model server.
pub const CHILD_ENV: &str = "GATEWAY_TEST_CHILD_MODEL_SERVER";
/// The line a child prints when it listens, followed by its address.
pub const LISTENING: &str = "CHILD-LISTENING ";

/// A model server in a child process: the test binary started again to run `entry`.
pub struct ChildServer {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
}

impl ChildServer {
    /// Starts the test `entry` of this test binary with `CHILD_ENV=kind` and waits for its address.
    pub async fn start(entry: &str, kind: &str, within: Duration) -> ChildServer {
        let exe = std::env::current_exe().unwrap();
        let mut child = tokio::process::Command::new(exe)
            .args([
                entry,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, kind)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(within, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                // libtest has printed `test <name> ... ` without a newline before the test body runs.
                if let Some((_, addr)) = line.split_once(LISTENING) {
                    return addr.trim().parse::<SocketAddr>().unwrap();
                }
            }
            panic!("the child model server exited before listening");
        })
        .await
        .expect("the child model server did not start in time");
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChildServer { addr, child }
    }

    /// Sends `signal` (e.g. `-KILL`, `-TERM`) to the child.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("child still running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid} failed");
    }
}
