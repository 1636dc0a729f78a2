//! A gRPC model server for image classifiers: a candle backend behind the
//! Open Inference Protocol (KServe v2 / Triton `inference.GRPCInferenceService`).

pub mod backend;
pub mod batcher;
pub mod codec;
pub mod config;
pub mod convert;
pub mod detections;
pub mod error;
pub mod http;
pub mod kernels;
pub mod lifecycle;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod pools;
pub mod registry;
pub mod repository;
pub mod repository_setup;
pub mod rest;
pub mod service;
pub mod stats;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use oip_proto::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use config::Config;

use config::ControlMode;
use lifecycle::Lifecycle;
use load::LoadOptions;
use registry::Registry;
use service::InferenceService;

/// Serves gRPC on `listener` and HTTP on `--http-addr` until `shutdown` completes. Health reports
/// NOT_SERVING until every model has loaded and answered a warm-up request.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding the HTTP address {}", config.http_addr))?;
    serve_with(config, listener, http_listener, shutdown).await
}

/// [`serve`] with the HTTP listener bound by the caller (tests bind port 0 and read the port).
pub async fn serve_with(
    config: Config,
    listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // Before anything else: a GPU that cannot be had is a configuration error, not a model that fails to load.
    let device = config.device.open()?;
    repository::check_root(&config.model_repository)?;
    if config.model_control_mode == ControlMode::None
        && repository::model_names(&config.model_repository)?.is_empty()
    {
        return Err(repository::RepositoryError::Empty(config.model_repository.clone()).into());
    }
    let threads = config.inference_threads();
    let pools = Arc::new(pools::Pools::new(threads));
    // The flag's layout is started now, so pools that cannot start fail the server rather than every model.
    pools
        .get(config.instance_count())
        .context("starting the inference thread pools")?;
    let registry = Arc::new(Registry::new());
    let opts = LoadOptions {
        pools,
        instances: config.instance_count(),
        device,
        dtype: config.dtype(),
        max_batch_size: config.max_batch_size(),
        max_queue_delay: config.max_queue_delay(),
        queue_size: config.max_queue_size,
    };
    let lifecycle = Arc::new(
        Lifecycle::new(
            registry.clone(),
            config.model_repository.clone(),
            config.model_control_mode,
            opts,
        )
        .context("registering metrics")?,
    );
    let stopping = Arc::new(AtomicBool::new(false));
    let http_addr = http_listener.local_addr()?;
    let metrics = metrics::Metrics::new(registry.clone()).context("registering metrics")?;
    metrics
        .register(Box::new(lifecycle.failure_counter()))
        .context("registering metrics")?;
    let inference = Arc::new(InferenceService::new(
        lifecycle.clone(),
        config.max_batch_size(),
        config.instance_count(),
    ));
    let http_state = http::HttpState {
        metrics,
        lifecycle: lifecycle.clone(),
        inference: inference.clone(),
        max_body: config.max_message_size,
        draining: stopping.clone(),
    };
    let http_server = tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(http_listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, http::router(http_state)).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    // The HTTP port lives as long as the gRPC server: it goes when `serve` returns, however it returns.
    let _http_server = AbortOnDrop(http_server);

    let (health, health_service) = tonic_health::server::health_reporter();
    const SERVICE: &str = "inference.GRPCInferenceService";
    for name in ["", SERVICE] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    tracing::info!(device = ?config.device, dtype = %config.dtype, max_batch_size = config.max_batch_size(), max_queue_delay_us = config.max_queue_delay().as_micros() as u64, model_control_mode = %config.model_control_mode, "inference device");
    // Health follows readiness, which loads and unloads change after start-up too.
    let mut ready = lifecycle.watch_ready();
    let health_follower = {
        let (health, stopping) = (health.clone(), stopping.clone());
        tokio::spawn(async move {
            while ready.changed().await.is_ok() {
                let serving = *ready.borrow_and_update();
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let status = if serving {
                    tracing::info!("all models ready; serving");
                    ServingStatus::Serving
                } else {
                    tracing::error!("a model has no version that can serve; health is NOT_SERVING");
                    ServingStatus::NotServing
                };
                for name in ["", SERVICE] {
                    health.set_service_status(name, status).await;
                }
            }
        })
    };
    let _health_follower = AbortOnDrop(health_follower);
    let loader = {
        let lifecycle = lifecycle.clone();
        let (load_models, mode) = (config.load_models.clone(), config.model_control_mode);
        let interval = config.repository_poll_interval();
        async move {
            if let Err(e) = lifecycle.start(&load_models).await {
                tracing::error!(error = %e, "cannot read the model repository; health stays NOT_SERVING");
                return;
            }
            if mode == ControlMode::Poll {
                lifecycle.poll(interval).await;
            }
        }
    };
    let _loader = AbortOnDrop(tokio::spawn(loader));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(oip_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let inference = GrpcInferenceServiceServer::from_arc(inference)
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size);

    let addr = listener.local_addr()?;
    tracing::info!(%addr, %http_addr, tls = config.tls_cert.is_some(), mutual_tls = config.tls_client_ca.is_some(), threads, instances = config.instance_count(), repository = %config.model_repository.display(), "gRPC server listening");
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let (began, draining) = tokio::sync::oneshot::channel::<()>();
    let shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            stopping.store(true, Ordering::SeqCst);
            // Readiness goes first so balancers stop sending before we stop.
            for name in ["", SERVICE] {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: finishing calls in flight"
            );
            let _ = began.send(());
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls::server_config(&config)? {
        // A malformed certificate or key is found here, before the port answers.
        builder = builder
            .tls_config(tls)
            .context("the TLS certificate or key (--tls-cert, --tls-key, --tls-client-ca)")?;
    }
    if config.max_connection_age_secs > 0 {
        builder = builder
            .max_connection_age(Duration::from_secs(config.max_connection_age_secs))
            .max_connection_age_grace(Duration::from_secs(config.max_connection_age_grace_secs));
    }
    let serve = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        // Nagle's algorithm held small answers back until the client's delayed ACK, about 40 ms: most of a
        // request's latency at low concurrency.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return result.context("gRPC server failed"),
        _ = draining => {}
    }
    match tokio::time::timeout(grace, serve).await {
        Ok(result) => result.context("gRPC server failed"),
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "grace period over with calls still in flight; exiting"
            );
            Ok(())
        }
    }
}

/// Aborts a background task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes on SIGTERM (what Kubernetes and Docker send) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Binds `config.grpc_addr` and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding {}", config.grpc_addr))?;
    serve(config, listener, shutdown).await
}
