//! The HTTP gateway: turns "here is an image" into a prediction from an Open Inference Protocol model
//! server. [`app`] builds the router for tests; [`run`] serves it.

pub mod access;
pub mod batch;
pub mod config;
pub mod decode;
pub mod detect;
pub mod error;
pub mod fetch;
pub mod health;
pub mod metrics;
pub mod model_client;
pub mod models;
pub mod openapi;
pub mod page;
pub mod predict;
pub mod preprocess;
pub mod request;
pub mod routes;
pub mod telemetry;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use access::ApiKeys;
pub use config::Config;
use fetch::{FetchLimits, Fetcher, Policy};
use metrics::Metrics;
use model_client::{ModelCatalog, ModelClient};

/// Shared state of every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) config: Arc<Config>,
    pub(crate) catalog: Arc<ModelCatalog>,
    pub(crate) fetcher: Fetcher,
    pub(crate) images: Arc<Semaphore>,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) metrics: Metrics,
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) keys: Option<Arc<ApiKeys>>,
}

impl AppState {
    /// Checks `config` and builds the state around `model_client`.
    pub fn new(config: Config, model_client: Arc<dyn ModelClient>) -> anyhow::Result<Self> {
        let allow = config.validate()?;
        let fetcher = Fetcher::new(
            Policy::new(allow),
            FetchLimits {
                max_bytes: config.max_image_bytes,
                max_redirects: config.fetch_max_redirects,
                connect_timeout: Duration::from_millis(config.fetch_connect_timeout_ms),
                total_timeout: Duration::from_millis(config.fetch_timeout_ms),
            },
        )?;
        let metrics = Metrics::new()?;
        for collector in model_client.collectors()? {
            metrics.register(collector)?;
        }
        let keys = match &config.api_keys_file {
            Some(path) => {
                let keys = ApiKeys::load(path)?;
                metrics.api_keys_loaded(keys.len());
                if keys.is_empty() {
                    tracing::warn!(file = %path.display(), "the API key file holds no key: every request will be refused");
                }
                Some(Arc::new(keys))
            }
            None => None,
        };
        Ok(AppState {
            catalog: Arc::new(ModelCatalog::new(
                model_client,
                Duration::from_secs(config.metadata_ttl_secs),
            )),
            fetcher,
            images: Arc::new(Semaphore::new(config.concurrent_images())),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            keys,
            config: Arc::new(config),
        })
    }
}

/// The full router with its middleware.
pub fn app(state: AppState) -> Router {
    let cors = cors(&state.config.cors_allow_origin);
    // The key check runs inside `observe`, so refusals are logged and counted in the request's span.
    let router = routes::router(&state)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::observe,
        ))
        .with_state(state);
    // Outermost, so a browser's preflight `OPTIONS` is answered before routing, which knows no such method.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The CORS policy for `origins` (checked by the config's parser), or none when the list is empty.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let request_id = HeaderName::from_static("x-request-id");
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                request_id.clone(),
                HeaderName::from_static("traceparent"),
            ])
            .expose_headers([request_id])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Serves the gateway on `listener` until `shutdown` completes. Then readiness turns false, no new
/// connection or request is taken, and requests in flight get `--shutdown-grace-secs` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    model_client: Arc<dyn ModelClient>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = config.shutdown_grace();
    let state = AppState::new(config, model_client)?;
    // Dropped when `run` returns, which stops the key watcher and the metrics listener with the gateway.
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(keys) = &state.keys {
        tracing::info!(keys = keys.len(), names = ?keys.names(), "API keys required");
        let check = Duration::from_secs(state.config.api_keys_check_secs);
        tasks.spawn(access::watch(keys.clone(), state.metrics.clone(), check));
    }
    if let Some(address) = state.config.metrics_listen {
        let metrics = TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {address}: {e}"))?;
        tracing::info!(address = %metrics.local_addr()?, "metrics listening");
        let (router, _) = health::metrics_router().split_for_parts();
        let router = router.with_state(state.clone());
        tasks.spawn(async move {
            if let Err(e) = axum::serve(metrics, router).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let (began, draining) = tokio::sync::oneshot::channel::<()>();
    let flag = state.draining.clone();
    // Small JSON answers must not wait for the client's delayed ACK (Nagle), about 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let serve = axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            flag.store(true, Ordering::SeqCst);
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: finishing requests in flight"
            );
            let _ = began.send(());
        })
        .into_future();
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        _ = draining => {}
    }
    match tokio::time::timeout(grace, serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over with requests still in flight; exiting"
        ),
    }
    Ok(())
}
