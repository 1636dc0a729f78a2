//! The seam to the model tier: what the gateway needs from it, and a metadata cache in front of it.

pub mod discovery;
pub mod grpc;
pub mod metrics;
pub mod pool;
pub mod retry;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use utoipa::ToSchema;

pub use discovery::{Resolve, SystemResolver, Target};
pub use grpc::{ClientOptions, GrpcModelClient};

/// What a model does with an image, as its metadata shows: a detector's outputs are EfficientNMS's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Scores classes: served by `POST /predict`.
    #[default]
    Classification,
    /// Finds boxes: served by `POST /detect`.
    Detection,
}

impl ModelKind {
    /// The gateway route for this kind of model.
    pub fn route(self) -> &'static str {
        match self {
            ModelKind::Classification => "POST /predict",
            ModelKind::Detection => "POST /detect",
        }
    }

    /// What this kind of model is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            ModelKind::Classification => "a classifier",
            ModelKind::Detection => "a detector",
        }
    }
}

/// What the gateway must know about a model to feed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Version the inference names: the one asked for, or the newest served when none was ("" only when
    /// the metadata listed no version, leaving the choice to the server).
    pub version: String,
    /// Versions the model tier serves now, as the metadata lists them.
    pub versions: Vec<String>,
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
    /// Classifier or detector.
    pub kind: ModelKind,
    /// A detector's class names, in class order, from its ModelConfig (a classifier's come with each answer).
    pub labels: Arc<Vec<String>>,
    /// Most images one model call may carry, from ModelConfig's `max_batch_size`; a larger batch is sent as
    /// several calls. None when the model tier does not say.
    pub max_batch_size: Option<usize>,
}

/// One classification request to the model tier: a batch of images, run in as few model calls as the model's
/// `max_batch_size` allows.
#[derive(Debug, Clone)]
pub struct ClassifyRequest {
    /// The model as described by its metadata.
    pub spec: Arc<ModelSpec>,
    /// One buffer of `height * width * 3` RGB bytes per image, in the order the answers come back.
    pub images: Vec<Vec<u8>>,
    /// Classes wanted.
    pub top_k: u32,
    /// Passed on for correlating logs.
    pub request_id: String,
}

/// One detection request to the model tier: a batch of images, run in as few model calls as the model's
/// `max_batch_size` allows.
#[derive(Debug, Clone)]
pub struct DetectRequest {
    /// The model as described by its metadata.
    pub spec: Arc<ModelSpec>,
    /// One buffer of `height * width * 3` letterboxed RGB bytes per image, in the order the answers come back.
    pub images: Vec<Vec<u8>>,
    /// Lowest score kept; the model's default when absent.
    pub min_score: Option<f32>,
    /// Passed on for correlating logs.
    pub request_id: String,
}

/// One box a detector found, in the model input's pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedBox {
    /// Class index in the model's labels.
    pub class_id: i64,
    /// Human-readable class name.
    pub label: String,
    /// Confidence.
    pub score: f32,
    /// x1, y1, x2, y2.
    pub bbox: [f32; 4],
}

/// The model tier's answer to a detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Detections {
    /// Model that answered.
    pub model: String,
    /// Version that answered.
    pub version: String,
    /// Highest score first.
    pub boxes: Vec<DetectedBox>,
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
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

/// Where a model version is in its life on the model tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VersionState {
    /// Serving.
    Ready,
    /// Being loaded; not serving yet.
    Loading,
    /// Being unloaded; finishing what it was given.
    Unloading,
    /// Failed to load.
    Unavailable,
    /// A state this gateway does not know.
    Unknown,
}

impl VersionState {
    /// The state named by RepositoryIndex.
    pub fn parse(state: &str) -> Self {
        match state {
            "READY" => VersionState::Ready,
            "LOADING" => VersionState::Loading,
            "UNLOADING" => VersionState::Unloading,
            "UNAVAILABLE" => VersionState::Unavailable,
            _ => VersionState::Unknown,
        }
    }
}

/// One model version as the model tier's repository lists it. The server's reason for the state is left
/// out on purpose: it can name server files, and this reaches the internet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryEntry {
    /// Model name.
    pub model: String,
    /// Version, a decimal string.
    pub version: String,
    /// Where the version is in its life.
    pub state: VersionState,
}

/// A version as the model tier numbers them: a positive decimal integer without sign or spaces.
pub fn parse_version(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().filter(|&v| v > 0)
}

/// The numerically highest of `versions` ("10" is newer than "9"); what is not a version is skipped.
pub fn newest_version<'a>(versions: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    versions.into_iter().filter_map(parse_version).max()
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
    /// Runs the request's images through the model in one call and returns each one's `top_k` classes, in order.
    async fn classify(&self, request: ClassifyRequest) -> Result<Vec<Classification>, ModelError>;
    /// Runs the request's letterboxed images through a detector in one call and returns each one's boxes, in order.
    async fn detect(&self, request: DetectRequest) -> Result<Vec<Detections>, ModelError> {
        Err(ModelError::Unsupported(format!(
            "this model tier cannot run the detector {}",
            request.spec.name
        )))
    }
    /// Every model version the model tier has, in whatever state.
    async fn repository(&self) -> Result<Vec<RepositoryEntry>, ModelError>;
    /// Metrics of the transport (retries, errors, replicas) for the gateway's registry; none by default.
    fn collectors(&self) -> Result<Vec<Box<dyn prometheus::core::Collector>>, prometheus::Error> {
        Ok(Vec::new())
    }
}

/// A request [`ModelCatalog::run`] sends: what the model tier answers it with.
#[async_trait]
pub trait Call: Send {
    /// The model tier's answer.
    type Answer;
    /// Sends the request with `client`.
    async fn send(self, client: &dyn ModelClient) -> Result<Self::Answer, ModelError>;
}

// A batch whose every image failed before the model needs no call: its answer is empty.

#[async_trait]
impl Call for ClassifyRequest {
    type Answer = Vec<Classification>;
    async fn send(self, client: &dyn ModelClient) -> Result<Vec<Classification>, ModelError> {
        if self.images.is_empty() {
            return Ok(Vec::new());
        }
        client.classify(self).await
    }
}

#[async_trait]
impl Call for DetectRequest {
    type Answer = Vec<Detections>;
    async fn send(self, client: &dyn ModelClient) -> Result<Vec<Detections>, ModelError> {
        if self.images.is_empty() {
            return Ok(Vec::new());
        }
        client.detect(self).await
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

    /// The spec of `model` at `version`, from the cache while fresh. With `version` empty the spec is pinned
    /// to the newest version the metadata lists, so a new version is taken up within one TTL. Failures
    /// are not cached, so a model loaded later is found at once.
    pub async fn spec(&self, model: &str, version: &str) -> Result<Arc<ModelSpec>, ModelError> {
        let key = (model.to_owned(), version.to_owned());
        if let Some((at, spec)) = self.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(spec.clone());
        }
        let mut spec = self.client.metadata(model, version).await?;
        if version.is_empty()
            && let Some(newest) = newest_version(spec.versions.iter().map(String::as_str))
        {
            // The metadata's tensors are the newest version's; naming that version in the inference keeps
            // the pixels' size and the model that runs them together while other versions come and go.
            spec.version = newest.to_string();
        }
        let spec = Arc::new(spec);
        self.lock().insert(key, (Instant::now(), spec.clone()));
        Ok(spec)
    }

    /// Runs one call of `model` at `version` ("" for the newest served), starting from `spec` as
    /// [`spec`](Self::spec) gave it; `build` makes the request (a [`ClassifyRequest`] or a [`DetectRequest`])
    /// for a spec, pixels sized for it. When the catalog chose the version and the model tier says it is gone
    /// (NOT_FOUND) or going (UNAVAILABLE), the metadata is fetched again and the call made once more, on the
    /// version it names then. A version the caller named is not retried: its NOT_FOUND is the answer.
    pub async fn run<Q, E, F, Fut>(
        &self,
        model: &str,
        version: &str,
        spec: Arc<ModelSpec>,
        mut build: F,
    ) -> Result<Q::Answer, E>
    where
        Q: Call,
        E: From<ModelError>,
        F: FnMut(Arc<ModelSpec>) -> Fut,
        Fut: Future<Output = Result<Q, E>>,
    {
        let error = match build(spec.clone()).await?.send(&*self.client).await {
            Ok(answer) => return Ok(answer),
            Err(error) => error,
        };
        if !matches!(error, ModelError::NotFound(_) | ModelError::Unavailable(_)) {
            return Err(error.into());
        }
        self.forget(model, version, &spec);
        if !version.is_empty() {
            return Err(error.into());
        }
        tracing::info!(model, version = %spec.version, %error, "the version in use is gone or going; trying the newest served");
        let fresh = self.spec(model, version).await?;
        Ok(build(fresh).await?.send(&*self.client).await?)
    }

    /// Drops the entry of `model` at `version` if it names the same version as `stale`: an entry another
    /// request fetched before that version went names it too and is as stale; one that already names
    /// another version is kept.
    fn forget(&self, model: &str, version: &str, stale: &Arc<ModelSpec>) {
        let key = (model.to_owned(), version.to_owned());
        let mut entries = self.lock();
        if entries
            .get(&key)
            .is_some_and(|(_, cached)| cached.version == stale.version)
        {
            entries.remove(&key);
        }
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
                versions: Vec::new(),
                input: "pixels".into(),
                height: 2,
                width: 2,
                output: "probabilities".into(),
                classes: None,
                ..Default::default()
            })
        }
        async fn ready(&self, _: &str, _: &str) -> Result<bool, ModelError> {
            Ok(true)
        }
        async fn classify(&self, _: ClassifyRequest) -> Result<Vec<Classification>, ModelError> {
            Err(ModelError::Other("unused".into()))
        }
        async fn repository(&self) -> Result<Vec<RepositoryEntry>, ModelError> {
            Ok(Vec::new())
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

    /// A model tier whose served versions a test sets; version N takes N * 10 pixels a side, so a
    /// request sized for another version is caught.
    #[derive(Default)]
    struct Tier {
        served: Mutex<Vec<u64>>,
        /// Returned by every `classify` instead of looking at the versions.
        error: Mutex<Option<ModelError>>,
        metadata_calls: AtomicUsize,
        /// The version each `classify` named.
        asked: Mutex<Vec<String>>,
    }

    impl Tier {
        fn serving(versions: &[u64]) -> Arc<Self> {
            let tier = Tier::default();
            tier.serve(versions);
            Arc::new(tier)
        }
        fn serve(&self, versions: &[u64]) {
            *self.served.lock().unwrap() = versions.to_vec();
        }
        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
        fn metadata_calls(&self) -> usize {
            self.metadata_calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl ModelClient for Tier {
        async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError> {
            self.metadata_calls.fetch_add(1, Ordering::SeqCst);
            let served = self.served.lock().unwrap().clone();
            // Listed in no order, as nothing promises one.
            let versions: Vec<String> = served.iter().rev().map(u64::to_string).collect();
            let described = if version.is_empty() {
                served.iter().max().copied()
            } else {
                parse_version(version).filter(|v| served.contains(v))
            }
            .ok_or_else(|| ModelError::NotFound(format!("no version `{version}`")))?;
            Ok(ModelSpec {
                name: model.into(),
                version: version.into(),
                versions,
                input: "pixels".into(),
                height: described as u32 * 10,
                width: described as u32 * 10,
                output: "probabilities".into(),
                classes: Some(10),
                ..Default::default()
            })
        }
        async fn ready(&self, _: &str, _: &str) -> Result<bool, ModelError> {
            Ok(true)
        }
        async fn classify(
            &self,
            request: ClassifyRequest,
        ) -> Result<Vec<Classification>, ModelError> {
            let spec = &request.spec;
            self.asked.lock().unwrap().push(spec.version.clone());
            if let Some(error) = self.error.lock().unwrap().clone() {
                return Err(error);
            }
            let version = parse_version(&spec.version)
                .filter(|v| self.served.lock().unwrap().contains(v))
                .ok_or_else(|| ModelError::NotFound(format!("no version `{}`", spec.version)))?;
            let side = version as usize * 10;
            if request
                .images
                .iter()
                .any(|image| image.len() != side * side * 3)
            {
                return Err(ModelError::InvalidArgument(format!(
                    "version {version} takes {side}x{side} pixels"
                )));
            }
            Ok(vec![Classification {
                model: spec.name.clone(),
                version: version.to_string(),
                predictions: Vec::new(),
            }])
        }
        async fn repository(&self) -> Result<Vec<RepositoryEntry>, ModelError> {
            Ok(Vec::new())
        }
    }

    /// Builds a request the way the gateway does: pixels sized for the spec it is given.
    async fn sized(spec: Arc<ModelSpec>) -> Result<ClassifyRequest, ModelError> {
        let pixels = vec![0; spec.height as usize * spec.width as usize * 3];
        Ok(ClassifyRequest {
            spec,
            images: vec![pixels],
            top_k: 1,
            request_id: "r".into(),
        })
    }

    async fn classify(catalog: &ModelCatalog, version: &str) -> Result<Classification, ModelError> {
        let spec = catalog.spec("m", version).await?;
        let mut answers = catalog.run("m", version, spec, sized).await?;
        answers
            .pop()
            .ok_or_else(|| ModelError::Other("no answer".into()))
    }

    #[test]
    fn versions_are_positive_decimal_integers_compared_as_numbers() {
        assert_eq!(parse_version("2"), Some(2));
        assert_eq!(parse_version("02"), Some(2));
        for bad in [
            "",
            "0",
            "+2",
            "-1",
            " 2",
            "1.5",
            "v2",
            "99999999999999999999",
        ] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
        assert_eq!(newest_version(["9", "10", "2"]), Some(10));
        assert_eq!(newest_version(["x", "3"]), Some(3));
        assert_eq!(newest_version([]), None);
        assert_eq!(VersionState::parse("UNLOADING"), VersionState::Unloading);
        assert_eq!(VersionState::parse("EXPLODED"), VersionState::Unknown);
    }

    #[tokio::test]
    async fn without_a_version_the_spec_pins_the_highest_listed_one() {
        let tier = Tier::serving(&[2, 10, 9]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        let pinned = catalog.spec("m", "").await.unwrap();
        assert_eq!((pinned.version.as_str(), pinned.height), ("10", 100));
        let named = catalog.spec("m", "9").await.unwrap();
        assert_eq!((named.version.as_str(), named.height), ("9", 90));

        let answer = classify(&catalog, "").await.unwrap();
        assert_eq!(answer.version, "10");
        assert_eq!(tier.asked(), ["10"]);
    }

    #[tokio::test]
    async fn a_new_version_is_taken_up_when_the_entry_expires() {
        let tier = Tier::serving(&[1]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        assert_eq!(classify(&catalog, "").await.unwrap().version, "1");
        tier.serve(&[1, 2]);
        // Still fresh, and version 1 still served: the cached version keeps running.
        assert_eq!(classify(&catalog, "").await.unwrap().version, "1");

        let expiring = ModelCatalog::new(tier.clone(), Duration::ZERO);
        assert_eq!(classify(&expiring, "").await.unwrap().version, "2");
    }

    #[tokio::test]
    async fn a_pinned_version_gone_is_fetched_again_and_retried_once_at_its_size() {
        let tier = Tier::serving(&[1]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        assert_eq!(classify(&catalog, "").await.unwrap().version, "1");
        assert_eq!(tier.metadata_calls(), 1);

        // Version 1 is replaced by version 2, which takes bigger images, within the TTL.
        tier.serve(&[2]);
        let answer = classify(&catalog, "").await.unwrap();
        assert_eq!(answer.version, "2");
        assert_eq!(tier.asked(), ["1", "1", "2"]);
        assert_eq!(tier.metadata_calls(), 2);
        // The fresh spec replaced the stale one in the cache.
        assert_eq!(classify(&catalog, "").await.unwrap().version, "2");
        assert_eq!(tier.metadata_calls(), 2);
    }

    #[tokio::test]
    async fn an_entry_refetched_before_the_version_went_is_dropped_with_it() {
        let tier = Tier::serving(&[1]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        let held = catalog.spec("m", "").await.unwrap();
        // Another request refreshes the entry while version 1 still serves: a new spec naming version 1.
        catalog.forget("m", "", &held);
        let refreshed = catalog.spec("m", "").await.unwrap();
        assert!(!Arc::ptr_eq(&held, &refreshed));
        tier.serve(&[2]);
        let answer = catalog.run("m", "", held, sized).await.unwrap();
        assert_eq!(answer[0].version, "2");
        assert_eq!(tier.asked(), ["1", "2"]);
    }

    #[tokio::test]
    async fn an_unavailable_pinned_version_is_retried_once_then_answered() {
        let tier = Tier::serving(&[1]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        *tier.error.lock().unwrap() = Some(ModelError::Unavailable("unloading".into()));
        let error = classify(&catalog, "").await.unwrap_err();
        assert!(matches!(error, ModelError::Unavailable(_)), "{error:?}");
        assert_eq!(tier.asked(), ["1", "1"]);
        assert_eq!(tier.metadata_calls(), 2);
    }

    #[tokio::test]
    async fn a_named_version_gone_is_not_retried_but_forgotten() {
        let tier = Tier::serving(&[1, 2]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        assert_eq!(classify(&catalog, "1").await.unwrap().version, "1");
        tier.serve(&[2]);
        let spec = catalog.spec("m", "1").await.unwrap();
        let error = catalog.run("m", "1", spec, sized).await.unwrap_err();
        assert!(matches!(error, ModelError::NotFound(_)), "{error:?}");
        assert_eq!(tier.asked(), ["1", "1"]);
        assert_eq!(tier.metadata_calls(), 1);
        // The next request asks the model tier again rather than trusting the dead entry.
        assert!(matches!(
            catalog.spec("m", "1").await,
            Err(ModelError::NotFound(_))
        ));
        assert_eq!(tier.metadata_calls(), 2);
    }

    #[tokio::test]
    async fn other_failures_are_not_retried_and_keep_the_entry() {
        let tier = Tier::serving(&[1]);
        let catalog = ModelCatalog::new(tier.clone(), Duration::from_secs(60));
        for error in [
            ModelError::InvalidArgument("bad".into()),
            ModelError::Overloaded("full".into()),
            ModelError::DeadlineExceeded("late".into()),
        ] {
            *tier.error.lock().unwrap() = Some(error);
            assert!(classify(&catalog, "").await.is_err());
        }
        assert_eq!(tier.asked(), ["1", "1", "1"]);
        assert_eq!(tier.metadata_calls(), 1);
    }
}
