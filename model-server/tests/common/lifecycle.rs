//! Helpers of the lifecycle tests: a scratch repository, the control calls, the index, a background load.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oip_proto::GrpcInferenceServiceClient;
use oip_proto::inference::model_infer_request::InferInputTensor;
use oip_proto::inference::model_repository_parameter::ParameterChoice;
use oip_proto::inference::*;
use tonic::transport::Channel;

use super::{TestServer, golden_pixels, model_repository};

pub const MODEL: &str = "efficientnet-lite0";

/// A server on `repo` with `flags`, ready, and a client of it.
pub async fn serve(
    repo: &Repo,
    flags: &[&str],
) -> (TestServer, GrpcInferenceServiceClient<Channel>) {
    let server = TestServer::start_with(&repo.0, flags).await;
    server.wait_ready().await;
    let client = server.client().await;
    (server, client)
}

/// A fresh repository under the temp directory; removed when dropped.
pub struct Repo(pub PathBuf);

impl Repo {
    pub fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("lifecycle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("mkdir");
        Self(root)
    }

    /// Copies the real model's version 1 into `<model>/<version>` (copies, not links: tests write into them).
    pub fn add(&self, model: &str, version: u64) -> PathBuf {
        let dir = self.0.join(model).join(version.to_string());
        copy_version(&dir);
        dir
    }

    /// Copies the real model's version 1 into `<model>/<version>`, set to take the normalised FP32 input.
    pub fn add_normalised(&self, model: &str, version: u64) -> PathBuf {
        let dir = self.add(model, version);
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).expect("config");
        let mut config: serde_json::Value = serde_json::from_str(&text).expect("config JSON");
        config["input_format"] = "normalised".into();
        std::fs::write(&path, config.to_string()).expect("write config");
        dir
    }

    /// Publishes a version the safe way: copied under a temporary name, then renamed into place.
    pub fn publish(&self, model: &str, version: u64) -> PathBuf {
        let staging = self.0.join(model).join(format!(".tmp-{version}"));
        copy_version(&staging);
        let dir = self.0.join(model).join(version.to_string());
        std::fs::rename(&staging, &dir).expect("rename into place");
        dir
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn source_version() -> PathBuf {
    model_repository().join(MODEL).join("1")
}

pub fn copy_version(to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(source_version()).expect("read source") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

pub fn weights_bytes() -> u64 {
    std::fs::metadata(source_version().join("model.safetensors"))
        .expect("weights")
        .len()
}

pub fn infer_request(model: &str, version: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 224, 224, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![golden_pixels("chelsea")],
        ..Default::default()
    }
}

pub async fn infer(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    version: &str,
) -> Result<String, tonic::Status> {
    client
        .model_infer(infer_request(model, version))
        .await
        .map(|r| r.into_inner().model_version)
}

pub fn config_param(json: &str) -> std::collections::HashMap<String, ModelRepositoryParameter> {
    [(
        "config".to_owned(),
        ModelRepositoryParameter {
            parameter_choice: Some(ParameterChoice::StringParam(json.to_owned())),
        },
    )]
    .into()
}

pub async fn load(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    config: Option<&str>,
) -> Result<(), tonic::Status> {
    client
        .repository_model_load(RepositoryModelLoadRequest {
            repository_name: String::new(),
            model_name: model.into(),
            parameters: config.map(config_param).unwrap_or_default(),
        })
        .await
        .map(|_| ())
}

pub async fn unload(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
) -> Result<(), tonic::Status> {
    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            repository_name: String::new(),
            model_name: model.into(),
            parameters: Default::default(),
        })
        .await
        .map(|_| ())
}

/// The index as `(model, version, state, reason)`.
pub async fn index(
    client: &mut GrpcInferenceServiceClient<Channel>,
) -> Vec<(String, String, String, String)> {
    client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.name, m.version, m.state, m.reason))
        .collect()
}

/// Waits until `pred` holds for the index, for at most `limit`; returns how long it took.
pub async fn wait_index(
    client: &mut GrpcInferenceServiceClient<Channel>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&[(String, String, String, String)]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let now = index(client).await;
        if pred(&now) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; index {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn versions_in(
    index: &[(String, String, String, String)],
    model: &str,
    state: &str,
) -> Vec<String> {
    index
        .iter()
        .filter(|(m, _, s, _)| m == model && s == state)
        .map(|(_, v, _, _)| v.clone())
        .collect()
}

/// Requests sent by a background load, and the ones that failed (with their errors).
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub errors: std::sync::Mutex<Vec<String>>,
    pub latencies_us: std::sync::Mutex<Vec<u64>>,
}

impl Tally {
    /// The number of successful requests in `range` (in completion order) and their p99 latency.
    pub fn p99(&self, range: std::ops::Range<usize>) -> (usize, Duration) {
        let mut l = self.latencies_us.lock().unwrap()[range].to_vec();
        l.sort_unstable();
        let p99 = l
            .get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        (l.len(), Duration::from_micros(p99))
    }

    pub fn count(&self) -> usize {
        self.latencies_us.lock().unwrap().len()
    }
}

/// `concurrency` loops sending requests for `model` (newest version) until `stop`.
pub fn background_load(
    server: &TestServer,
    model: &'static str,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let addr = server.addr;
    let tasks = (0..concurrency)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
                let mut client = GrpcInferenceServiceClient::new(channel);
                while !stop.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    match infer(&mut client, model, "").await {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::SeqCst);
                            tally
                                .latencies_us
                                .lock()
                                .unwrap()
                                .push(start.elapsed().as_micros() as u64);
                        }
                        Err(e) => {
                            tally.failed.fetch_add(1, Ordering::SeqCst);
                            tally.errors.lock().unwrap().push(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

pub async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("load task");
    }
}

pub fn assert_no_failures(tally: &Tally) {
    let failed = tally.failed.load(Ordering::SeqCst);
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}: {:?}",
        failed + tally.ok.load(Ordering::SeqCst),
        tally
            .errors
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(tally.ok.load(Ordering::SeqCst) > 0, "the load sent nothing");
}

pub async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

pub async fn metric(http: std::net::SocketAddr, name_and_labels: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await.expect("connect");
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
