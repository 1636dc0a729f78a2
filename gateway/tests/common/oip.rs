//! A fast fake model tier over real gRPC: answers ModelInfer after a fixed delay with a made-up class,
//! counts what it served in ModelStatistics. It serves the model versions of its [`Repository`], which a
//! test can change while it runs, and refuses pixels not sized for the version asked for. Runs as a task
//! in the test, or as a child process the test can SIGKILL (the test binary started again; see
//! `replicas.rs`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oip_proto::inference::model_infer_response::InferOutputTensor;
use oip_proto::inference::model_metadata_response::TensorMetadata;
use oip_proto::inference::repository_index_response::ModelIndex;
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
    /// ModelMetadata calls answered or refused.
    pub metadata_calls: AtomicU64,
    /// The `model_version` of every ModelInfer, in order.
    pub asked: Mutex<Vec<String>>,
}

impl Counters {
    /// The `model_version` of every ModelInfer so far.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

/// One version of a model in the fake.
#[derive(Debug, Clone, Copy)]
pub struct FakeVersion {
    /// Its number.
    pub version: u64,
    /// READY, LOADING, UNLOADING or UNAVAILABLE.
    pub state: &'static str,
    /// Height and width of its input.
    pub size: i64,
}

/// The models and versions the fake has, by model name; a test changes them while the fake runs.
pub struct Repository(Mutex<BTreeMap<String, Vec<FakeVersion>>>);

impl Default for Repository {
    /// `efficientnet-lite0` version 1, ready, 224x224.
    fn default() -> Self {
        let repository = Repository(Mutex::new(BTreeMap::new()));
        repository.set("efficientnet-lite0", &[(1, "READY", 224)]);
        repository
    }
}

impl Repository {
    /// Makes `model` have exactly `versions`, as (version, state, input size); none removes it.
    pub fn set(&self, model: &str, versions: &[(u64, &'static str, i64)]) {
        let mut models = self.0.lock().unwrap();
        if versions.is_empty() {
            models.remove(model);
            return;
        }
        let versions = versions
            .iter()
            .map(|&(version, state, size)| FakeVersion {
                version,
                state,
                size,
            })
            .collect();
        models.insert(model.to_owned(), versions);
    }

    fn versions(&self, model: &str) -> Result<Vec<FakeVersion>, Status> {
        let mut versions = self
            .0
            .lock()
            .unwrap()
            .get(model)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("unknown model `{model}`")))?;
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    /// The version ModelInfer runs: the one named, if ready, or the highest ready one.
    fn resolve(&self, model: &str, version: &str) -> Result<FakeVersion, Status> {
        let versions = self.versions(model)?;
        let found = if version.is_empty() {
            versions.iter().rev().find(|v| v.state == "READY")
        } else {
            versions.iter().find(|v| v.version.to_string() == version)
        };
        match found {
            None => Err(no_version(model, version, &versions)),
            Some(v) if v.state == "READY" => Ok(*v),
            Some(v) => Err(Status::unavailable(format!(
                "model `{model}` version `{}` is {}",
                v.version,
                v.state.to_lowercase()
            ))),
        }
    }
}

/// The model server's answer for a version it does not have.
fn no_version(model: &str, version: &str, versions: &[FakeVersion]) -> Status {
    let available: Vec<String> = versions.iter().map(|v| v.version.to_string()).collect();
    Status::not_found(format!(
        "model `{model}` has no version `{version}` (available: {})",
        available.join(", ")
    ))
}

#[derive(Clone)]
struct Fake {
    latency: Duration,
    counters: Arc<Counters>,
    repository: Arc<Repository>,
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
        self.counters.metadata_calls.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        let versions = self.repository.versions(&request.name)?;
        let ready: Vec<&FakeVersion> = versions.iter().filter(|v| v.state == "READY").collect();
        let described = if request.version.is_empty() {
            ready.last().copied()
        } else {
            versions
                .iter()
                .find(|v| v.version.to_string() == request.version)
        }
        .ok_or_else(|| no_version(&request.name, &request.version, &versions))?;
        Ok(Response::new(ModelMetadataResponse {
            name: request.name,
            versions: ready.iter().map(|v| v.version.to_string()).collect(),
            platform: "fake".into(),
            inputs: vec![tensor(
                "pixels",
                "UINT8",
                &[-1, described.size, described.size, 3],
            )],
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
        self.counters
            .asked
            .lock()
            .unwrap()
            .push(request.model_version.clone());
        let version = self
            .repository
            .resolve(&request.model_name, &request.model_version)?;
        let side = version.size;
        let shape_fits = request
            .inputs
            .first()
            .is_some_and(|input| input.shape == [1, side, side, 3]);
        let bytes_fit = request
            .raw_input_contents
            .first()
            .is_some_and(|raw| raw.len() as i64 == side * side * 3);
        if !(shape_fits && bytes_fit) {
            return Err(Status::invalid_argument(format!(
                "version {} takes [1, {side}, {side}, 3] pixels",
                version.version
            )));
        }
        tokio::time::sleep(self.latency).await;
        let class = b"0.9:967:espresso";
        let mut raw = (class.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(class);
        self.counters.served.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ModelInferResponse {
            model_name: request.model_name,
            model_version: version.version.to_string(),
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
        Ok(Response::new(ModelConfigResponse {
            config: Some(ModelConfig {
                max_batch_size: 8,
                ..Default::default()
            }),
        }))
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
        let models = self.repository.0.lock().unwrap().clone();
        let models = models
            .into_iter()
            .flat_map(|(name, versions)| {
                versions.into_iter().map(move |v| ModelIndex {
                    name: name.clone(),
                    version: v.version.to_string(),
                    state: v.state.into(),
                    // Stands for what a real server may say: nothing a client should see.
                    reason: format!("{SECRET_REASON} {name}/{}", v.version),
                })
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}

/// The start of every RepositoryIndex reason the fake gives, for tests checking it goes no further.
pub const SECRET_REASON: &str = "server-internal-detail";

/// A fake model server running as a task of the test.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    /// What it serves; change it to roll versions out.
    pub repository: Arc<Repository>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeServer {
    /// Serves on `addr` (port 0 for any) answering each inference after `latency`.
    pub async fn start(addr: &str, latency: Duration) -> FakeServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let repository = Arc::new(Repository::default());
        let (addr, counters, stop) = serve_repository(listener, latency, repository.clone());
        FakeServer {
            addr,
            counters,
            repository,
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

/// Serves the fake with its default repository on `listener` until the returned sender fires or is
/// dropped.
pub fn serve(
    listener: tokio::net::TcpListener,
    latency: Duration,
) -> (SocketAddr, Arc<Counters>, oneshot::Sender<()>) {
    serve_repository(listener, latency, Arc::new(Repository::default()))
}

/// Serves the versions of `repository` on `listener` until the returned sender fires or is dropped.
pub fn serve_repository(
    listener: tokio::net::TcpListener,
    latency: Duration,
    repository: Arc<Repository>,
) -> (SocketAddr, Arc<Counters>, oneshot::Sender<()>) {
    let addr = listener.local_addr().unwrap();
    let counters = Arc::new(Counters::default());
    let fake = Fake {
        latency,
        counters: counters.clone(),
        repository,
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
