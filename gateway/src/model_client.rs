//! The seam to the model tier: what the gateway needs from it, and a metadata cache in front of it.

pub mod discovery;
pub mod grpc;
pub mod metrics;
pub mod pool;
pub mod retry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;

pub use discovery::{Resolve, SystemResolver, Target};
pub use grpc::{ClientOptions, GrpcModelClient};

/// What the gateway must know about a model to feed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Version asked for ("" lets the server choose).
    pub version: String,
    /// Name of the UINT8 NHWC input.
    pub input: String,
    /// Input height in pixels.
    pub height: u32,
    /// Input width in pixels.
    pub width: u32,
    /// Output asked for with the classification extension.
    pub output: String,
    /// Number of classes, when the metadata says.
    pub classes: Option<u32>,
}

/// One classification request to the model tier.
#[derive(Debug, Clone)]
pub struct ClassifyRequest {
    /// The model as described by its metadata.
    pub spec: Arc<ModelSpec>,
    /// `height * width * 3` RGB bytes.
    pub pixels: Vec<u8>,
    /// Classes wanted.
    pub top_k: u32,
    /// Passed on for correlating logs.
    pub request_id: String,
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Human-readable class name.
    pub label: String,
    /// Class index in the model's output.
    pub index: i64,
    /// Softmax probability.
    pub probability: f32,
}

/// The model tier's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Model that answered.
    pub model: String,
    /// Version that answered.
    pub version: String,
    /// Highest probability first.
    pub predictions: Vec<Prediction>,
}

/// Failures of the model tier, one per gRPC status the gateway tells apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    /// Unknown model or version.
    #[error("{0}")]
    NotFound(String),
    /// The model tier refused the input.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model tier is overloaded.
    #[error("{0}")]
    Overloaded(String),
    /// The model tier is down or not ready.
    #[error("{0}")]
    Unavailable(String),
    /// The model tier did not answer in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The model has no input or output the gateway can use.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else the model tier reported.
    #[error("{0}")]
    Other(String),
}

/// The calls the gateway makes to the model tier.
#[async_trait]
pub trait ModelClient: Send + Sync + 'static {
    /// Describes `model` (input name, size; classification output).
    async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError>;
    /// Whether `model` can serve now.
    async fn ready(&self, model: &str, version: &str) -> Result<bool, ModelError>;
    /// Runs one image through the model and returns the `top_k` classes.
    async fn classify(&self, request: ClassifyRequest) -> Result<Classification, ModelError>;
    /// Metrics of the transport (retries, errors, replicas) for the gateway's registry; none by default.
    fn collectors(&self) -> Result<Vec<Box<dyn prometheus::core::Collector>>, prometheus::Error> {
        Ok(Vec::new())
    }
}

/// Specs by (model, version), with the time they were fetched.
type SpecCache = HashMap<(String, String), (Instant, Arc<ModelSpec>)>;

/// Model metadata cached for a while, so a prediction costs one model-tier call, not two.
pub struct ModelCatalog {
    client: Arc<dyn ModelClient>,
    ttl: Duration,
    entries: Mutex<SpecCache>,
}

impl ModelCatalog {
    /// A catalog over `client` keeping entries for `ttl`.
    pub fn new(client: Arc<dyn ModelClient>, ttl: Duration) -> Self {
        ModelCatalog {
            client,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The model client itself.
    pub fn client(&self) -> &Arc<dyn ModelClient> {
        &self.client
    }

    /// The spec of `model`, from the cache while fresh. Failures are not cached, so a model loaded later
    /// is found at once.
    pub async fn spec(&self, model: &str, version: &str) -> Result<Arc<ModelSpec>, ModelError> {
        let key = (model.to_owned(), version.to_owned());
        if let Some((at, spec)) = self.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(spec.clone());
        }
        let spec = Arc::new(self.client.metadata(model, version).await?);
        self.lock().insert(key, (Instant::now(), spec.clone()));
        Ok(spec)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpecCache> {
        // The map holds no invariant a panicking holder could break, so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    #[async_trait]
    impl ModelClient for Counting {
        async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if model == "missing" {
                return Err(ModelError::NotFound("no such model".into()));
            }
            Ok(ModelSpec {
                name: model.into(),
                version: version.into(),
                input: "pixels".into(),
                height: 2,
                width: 2,
                output: "probabilities".into(),
                classes: None,
            })
        }
        async fn ready(&self, _: &str, _: &str) -> Result<bool, ModelError> {
            Ok(true)
        }
        async fn classify(&self, _: ClassifyRequest) -> Result<Classification, ModelError> {
            Err(ModelError::Other("unused".into()))
        }
    }

    #[tokio::test]
    async fn metadata_is_cached_until_the_ttl_passes() {
        let client = Arc::new(Counting(AtomicUsize::new(0)));
        let catalog = ModelCatalog::new(client.clone(), Duration::from_secs(60));
        catalog.spec("m", "").await.unwrap();
        catalog.spec("m", "").await.unwrap();
        assert_eq!(client.0.load(Ordering::SeqCst), 1);
        catalog.spec("m", "2").await.unwrap();
        assert_eq!(client.0.load(Ordering::SeqCst), 2);

        let expired = ModelCatalog::new(client.clone(), Duration::ZERO);
        expired.spec("m", "").await.unwrap();
        expired.spec("m", "").await.unwrap();
        assert_eq!(client.0.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let client = Arc::new(Counting(AtomicUsize::new(0)));
        let catalog = ModelCatalog::new(client.clone(), Duration::from_secs(60));
        assert!(catalog.spec("missing", "").await.is_err());
        assert!(catalog.spec("missing", "").await.is_err());
        assert_eq!(client.0.load(Ordering::SeqCst), 2);
    }
}
