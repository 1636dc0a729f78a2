//! Shared helpers for the model-server integration tests.
#![allow(dead_code)]

pub mod lifecycle;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

/// The four golden photos and their expected top-1 ImageNet class.
pub const PHOTOS: [(&str, usize); 4] = [
    ("chelsea", 282),
    ("coffee", 967),
    ("rocket", 657),
    ("camera", 872),
];

/// Workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Golden test data copied from the independent numpy reference.
pub fn golden(file: &str) -> PathBuf {
    workspace().join("testdata/golden").join(file)
}

/// Python with tritonclient[grpc] and numpy: `OIP_PYTHON`, else the
/// project's virtual environment that scripts/test.sh creates.
pub fn python() -> PathBuf {
    let python = std::env::var_os("OIP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        python.is_file(),
        "{} not found: run scripts/test.sh (it creates .venv with tritonclient[grpc] and numpy) or set OIP_PYTHON",
        python.display()
    );
    python
}

/// A file of the official darknet YOLOv3-tiny release, which `scripts/setup-model-repository.sh` puts in `.cache/`.
pub fn darknet_file(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/yolov3-tiny")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup-model-repository.sh",
        path.display()
    );
    path
}

/// The model repository the tests run against (MODEL_REPOSITORY overrides).
pub fn model_repository() -> PathBuf {
    let repo = std::env::var_os("MODEL_REPOSITORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("model-repository"));
    let weights = repo.join("efficientnet-lite0/1/model.safetensors");
    assert!(
        weights.is_file(),
        "{} is missing: create the model repository with scripts/setup-model-repository.sh",
        weights.display()
    );
    repo
}

/// The default repository, which must hold the detector `yolov3-tiny` (scripts/setup-model-repository.sh makes it
/// unless told not to).
pub fn detector_repository() -> PathBuf {
    let repo = model_repository();
    let config = repo.join("yolov3-tiny/1/config.json");
    assert!(
        config.is_file(),
        "{} is missing: create the detector with scripts/setup-model-repository.sh (without --no-detector)",
        config.display()
    );
    repo
}

/// Path of the default model's weights.
pub fn weights() -> PathBuf {
    model_repository().join("efficientnet-lite0/1/model.safetensors")
}

/// A two-thread pool like the server's, so candle runs inside rayon.
pub fn pool() -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("thread pool"),
    )
}

/// Golden logits `[1, 1000]` as a flat vector.
pub fn golden_logits(name: &str) -> Vec<f32> {
    Tensor::read_npy(golden(&format!("{name}.logits.npy")))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("golden logits")
}

/// Golden photo as uint8 RGB pixels, HWC `224x224x3`, exactly the golden
/// input tensor scaled back to 0..255 (`p = x * 128 + 127`).
pub fn golden_pixels(name: &str) -> Vec<u8> {
    let t = Tensor::read_npy(golden(&format!("{name}.pixels.npy"))).expect("golden pixels");
    assert_eq!(t.dims(), [224, 224, 3]);
    assert_eq!(t.dtype(), DType::U8);
    t.flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .expect("pixels")
}

/// The reference's synthetic input: SplitMix64 (seed 0) over the flat NCHW
/// index, `x_i = (z >> 40) * 2^-23 - 1`, exact in f32.
pub fn splitmix_input() -> Vec<f32> {
    (0..3 * 224 * 224u64)
        .map(|i| {
            let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 * 2f32.powi(-23) - 1.0
        })
        .collect()
}

/// Normalises HWC pixels to the NCHW `(x - 127) / 128` the network takes.
pub fn normalise(pixels: &[u8]) -> Vec<f32> {
    let t = Tensor::from_slice(pixels, (1, 224, 224, 3), &Device::Cpu).expect("tensor");
    let x = ((t.to_dtype(DType::F32).expect("f32") - 127.0).expect("sub") / 128.0).expect("div");
    x.permute((0, 3, 1, 2))
        .and_then(|x| x.flatten_all()?.to_vec1())
        .expect("nchw")
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .expect("non-empty")
}

/// A model server running in-process on a loopback port chosen by the OS.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    /// The HTTP side port: metrics and KServe v2 health.
    pub http_addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server on `repo` with extra command-line flags; does not wait for readiness.
    pub async fn start_with(repo: &Path, extra: &[&str]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http_addr = http.local_addr().expect("addr");
        let mut args = vec![
            "model-server",
            "--model-repository",
            repo.to_str().expect("utf-8 path"),
            "--threads",
            "2",
        ];
        args.extend_from_slice(extra);
        let config = <model_server::Config as clap::Parser>::try_parse_from(args).expect("config");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(model_server::serve_with(config, listener, http, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            http_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a server on the default repository and waits until it is ready.
    pub async fn start(extra: &[&str]) -> Self {
        let server = Self::start_with(&model_repository(), extra).await;
        server.wait_ready().await;
        server
    }

    /// A connected channel to the server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A client of the inference service.
    pub async fn client(&self) -> oip_proto::GrpcInferenceServiceClient<tonic::transport::Channel> {
        oip_proto::GrpcInferenceServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
    }

    /// Polls ServerReady until true, for at most a minute.
    pub async fn wait_ready(&self) {
        let mut client = self.client().await;
        for _ in 0..600 {
            let ready = client
                .server_ready(oip_proto::inference::ServerReadyRequest {})
                .await;
            if ready.map(|r| r.into_inner().ready).unwrap_or(false) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("model server did not become ready within 60 s");
    }

    /// Stops the server and waits for it to exit cleanly.
    /// Waits for the server to end by itself (a start-up error) and returns how it ended.
    pub async fn exit(mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("server task");
        tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .expect("the server kept running")
            .expect("server task")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server exited with an error");
        }
    }
}
