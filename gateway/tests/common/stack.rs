//! The real thing on loopback: a model server from the workspace's model repository, a gateway in front
//! of it, and a small HTTP server holding the golden photos.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use gateway::model_client::{ClientOptions, GrpcModelClient, ModelClient, SystemResolver};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The photos, their golden top-1 class and its label.
pub const PHOTOS: [(&str, i64, &str); 4] = [
    ("chelsea", 282, "tiger cat"),
    ("coffee", 967, "espresso"),
    ("rocket", 657, "missile"),
    ("camera", 872, "tripod"),
];

/// `MODEL_REPOSITORY`, or `model-repository` at the workspace root; fails loudly when absent, so a
/// missing repository never makes these tests pass by skipping.
pub fn model_repository() -> PathBuf {
    let path = std::env::var_os("MODEL_REPOSITORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model-repository"));
    assert!(
        path.is_dir(),
        "model repository {} not found: run scripts/setup-model-repository.sh first (or set MODEL_REPOSITORY)",
        path.display()
    );
    path
}

/// A model server running in this process until stopped.
pub struct ModelServer {
    pub addr: SocketAddr,
    /// The HTTP side port: `/metrics` and KServe v2 health.
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ModelServer {
    /// Starts on `addr` (`127.0.0.1:0` for any free port).
    pub async fn start(addr: SocketAddr) -> ModelServer {
        ModelServer::start_with(addr, &model_repository(), &[]).await
    }

    /// Starts on `addr` serving `repository`, with more command-line flags.
    pub async fn start_with(
        addr: SocketAddr,
        repository: &std::path::Path,
        extra: &[&str],
    ) -> ModelServer {
        let mut args = vec![
            "model-server".as_ref(),
            "--model-repository".as_ref(),
            repository.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let config = <model_server::Config as clap::Parser>::try_parse_from(args).unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(model_server::serve_with(config, listener, http, async {
            let _ = stopped.await;
        }));
        ModelServer {
            addr,
            http_addr,
            stop: Some(stop),
            task,
        }
    }

    /// Stops it and waits until it has let go of its port.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), &mut self.task).await {
            Ok(result) => result.unwrap().unwrap(),
            Err(_) => {
                self.task.abort();
                let _ = self.task.await;
            }
        }
    }
}

/// A gateway running in this process.
pub struct Gateway {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Gateway {
    /// Starts a gateway in front of `model_server`, allowed to fetch from loopback.
    pub async fn start(model_server: SocketAddr) -> Gateway {
        Gateway::start_with(model_server, &[]).await
    }

    /// Starts a gateway in front of `model_server` with more command-line flags.
    pub async fn start_with(model_server: SocketAddr, extra: &[&str]) -> Gateway {
        let model_url = format!("http://{model_server}");
        // Generous deadlines: the model server of a debug test build is far slower than a release one.
        let mut flags = vec![
            "--model-server",
            &model_url,
            "--fetch-allow",
            "127.0.0.1",
            "--inference-timeout-ms",
            "120000",
        ];
        flags.extend_from_slice(extra);
        let config = super::config(&flags);
        // As the binary builds it, so the TLS flags apply.
        let options = ClientOptions::from_config(&config).expect("model-tier options");
        let client = GrpcModelClient::start(options, Arc::new(SystemResolver));
        Gateway::serve(config, Arc::new(client)).await
    }

    /// Serves `config` in this process on a loopback port, calling the model tier through `client`.
    pub async fn serve(config: gateway::Config, client: Arc<dyn ModelClient>) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(gateway::run(config, listener, client, async {
            let _ = stopped.await;
        }));
        Gateway {
            url,
            stop: Some(stop),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Both tiers, a photo server and a client, ready to predict.
pub struct Stack {
    pub model_server: ModelServer,
    pub gateway: Gateway,
    /// Base URL of the photo server.
    pub photos: String,
    pub client: reqwest::Client,
}

impl Stack {
    /// Starts everything and waits until the gateway is ready (the first start loads and warms the model,
    /// which a debug build takes a while to do).
    pub async fn start() -> Stack {
        let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
        let gateway = Gateway::start(model_server.addr).await;
        let photos = photo_server().await;
        let client = http_client();
        wait_for_readyz(&client, &gateway.url, 200, Duration::from_secs(300)).await;
        // The gateway is ready with its default model; the tests may use every model in the repository.
        let all_loaded = format!("http://{}/v2/health/ready", model_server.http_addr);
        wait_for_status(&client, &all_loaded, 200, Duration::from_secs(300)).await;
        Stack {
            model_server,
            gateway,
            photos,
            client,
        }
    }

    /// `POST /predict` with a JSON body.
    pub async fn predict(&self, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}/predict", self.gateway.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }
}

/// Serves `GET /<name>.png` from the golden photos and `GET /yolo/<name>.png` from the detector's; returns its
/// base URL.
pub async fn photo_server() -> String {
    let router = Router::new()
        .route(
            "/{file}",
            get(|Path(file): Path<String>| async move {
                let name = file.strip_suffix(".png").unwrap_or(&file).to_owned();
                match PHOTOS.iter().find(|(n, ..)| *n == name) {
                    Some(_) => Ok(super::golden_png(&name)),
                    None => Err(StatusCode::NOT_FOUND),
                }
            }),
        )
        .route(
            "/yolo/{file}",
            get(|Path(file): Path<String>| async move {
                let name = file.strip_suffix(".png").unwrap_or(&file).to_owned();
                match super::YOLO_PHOTOS.iter().find(|n| **n == name) {
                    Some(_) => Ok(super::yolo_png(&name)),
                    None => Err(StatusCode::NOT_FOUND),
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

/// An HTTP client for talking to the gateway in tests.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// Polls `GET {gateway}/readyz` until it answers `status`, or panics after `within`.
pub async fn wait_for_readyz(
    client: &reqwest::Client,
    gateway: &str,
    status: u16,
    within: Duration,
) {
    wait_for_status(client, &format!("{gateway}/readyz"), status, within).await;
}

/// Polls `url` until it answers `status`; panics with its last answer after `within`.
pub async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16, within: Duration) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < within {
        match client.get(url).send().await {
            Ok(response) if response.status().as_u16() == status => return,
            Ok(response) => {
                last = Some(format!(
                    "{}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                ))
            }
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{url} did not answer {status} within {within:?}; last answer: {last:?}");
}
