//! Prediction: image bytes or URLs in, classes and per-phase timings out, per image.

use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;
use utoipa::ToSchema;

use crate::AppState;
use crate::batch::{self, Answer};
use crate::decode::decode;
use crate::error::ApiError;
use crate::model_client::{ClassifyRequest, ModelKind, ModelSpec, Prediction};
use crate::preprocess::preprocess;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// Fetched by the gateway.
    Url(String),
    /// Sent in the request.
    Bytes(Bytes),
}

/// A parsed predict or detect request.
#[derive(Debug)]
pub struct PredictInput {
    /// The images, in order; one the request did not say well enough keeps why.
    pub images: Vec<Result<ImageSource, ApiError>>,
    /// Whether the request used a list form and gets one result per image.
    pub batch: bool,
    /// Model name; the configured default when absent.
    pub model: Option<String>,
    /// Version, a positive decimal integer; the configured one when absent, and without either the newest
    /// the model tier serves.
    pub version: Option<String>,
    /// Classes wanted; the configured default when absent. Classification only.
    pub top_k: Option<u32>,
    /// Lowest score of a box returned; the model's default when absent. Detection only.
    pub min_score: Option<f32>,
}

/// The answer for one image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictResponse {
    /// Model that answered.
    pub model: ModelRef,
    /// Highest probability first.
    pub predictions: Vec<Prediction>,
    /// Milliseconds per phase.
    pub timings_ms: Timings,
    /// The request id, also in the `x-request-id` header.
    pub request_id: String,
}

/// Model name and version.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version that answered.
    pub version: String,
}

/// Milliseconds spent per phase.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Timings {
    /// Downloading the image (0 for uploads).
    pub fetch: f64,
    /// Decoding it.
    pub decode: f64,
    /// Cropping and resizing.
    pub preprocess: f64,
    /// The model-tier call, shared by the images of a batch.
    pub inference: f64,
    /// The whole request as the gateway saw it.
    pub total: f64,
}

/// Milliseconds to two decimals.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Takes one of the `--max-in-flight` places, or refuses at once: a full gateway answers 429 rather than
/// queueing without bound. Called before the body is read, so refused requests cost no memory.
pub fn admit(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    state.in_flight.clone().try_acquire_owned().map_err(|_| {
        state.metrics.shed();
        ApiError::Overloaded(state.config.max_in_flight)
    })
}

/// Runs the whole pipeline for the request's images, as one batch on the model tier; the caller holds its place
/// from [`admit`].
pub async fn predict(
    state: &AppState,
    input: PredictInput,
    request_id: &str,
) -> Result<Answer<PredictResponse>, ApiError> {
    let started = Instant::now();
    let config = &state.config;
    if input.min_score.is_some() {
        return Err(ApiError::BadRequest(
            "min_score is for detectors (POST /detect); POST /predict takes top_k".into(),
        ));
    }
    let (model, version) = resolve_model(&input, &config.default_model, &config.model_version);
    let spec = state.catalog.spec(&model, &version).await?;
    check_kind(&spec, ModelKind::Classification)?;
    // Checked before the images are fetched, so a wrong request costs no download.
    top_k_for(&spec, input.top_k, config.default_top_k)?;

    let fetched = batch::fetch_all(state, input.images, started).await;
    let requested_k = input.top_k;
    let outcomes = batch::infer(
        state,
        (&model, &version),
        spec,
        fetched,
        |spec| {
            let recipe = config.recipe_for(&spec.name);
            let (height, width) = (spec.height, spec.width);
            move |image: &RgbImage| {
                preprocess(image, recipe, height, width)
                    .map(|pixels| (pixels, ()))
                    .map_err(|e| ApiError::Internal(e.to_string()))
            }
        },
        |spec, images| {
            Ok(ClassifyRequest {
                top_k: top_k_for(&spec, requested_k, config.default_top_k)?,
                spec,
                images,
                request_id: request_id.to_owned(),
            })
        },
    )
    .await?;
    let results = outcomes
        .into_iter()
        .map(|(outcome, timings)| {
            outcome.map(|((), classification)| PredictResponse {
                model: ModelRef {
                    name: classification.model,
                    version: classification.version,
                },
                predictions: classification.predictions,
                timings_ms: timings,
                request_id: request_id.to_owned(),
            })
        })
        .collect();
    batch::answer(input.batch, results)
}

/// The model and version a request names, or its route's defaults ("" for the newest version served).
pub(crate) fn resolve_model(
    input: &PredictInput,
    default_model: &str,
    default_version: &str,
) -> (String, String) {
    let model = input
        .model
        .clone()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| default_model.to_owned());
    let version = input
        .version
        .clone()
        .unwrap_or_else(|| default_version.to_owned());
    (model, version)
}

/// A clear 400 when the model is not the kind the route serves, naming the route that serves it.
pub(crate) fn check_kind(spec: &ModelSpec, wanted: ModelKind) -> Result<(), ApiError> {
    if spec.kind == wanted {
        return Ok(());
    }
    Err(ApiError::BadRequest(format!(
        "model `{}` is {}: send it to {}, not {}",
        spec.name,
        spec.kind.noun(),
        spec.kind.route(),
        wanted.route()
    )))
}

/// The image's bytes: as sent, or fetched from its URL (timed in `timings.fetch`).
pub(crate) async fn fetch_image(
    state: &AppState,
    source: ImageSource,
    timings: &mut Timings,
) -> Result<Bytes, ApiError> {
    match source {
        ImageSource::Bytes(bytes) => Ok(bytes),
        ImageSource::Url(url) => {
            let t = Instant::now();
            let bytes = state
                .fetcher
                .fetch(&url)
                .instrument(tracing::info_span!("fetch"))
                .await?;
            state.metrics.phase("fetch", t.elapsed());
            state.metrics.fetched(bytes.len());
            timings.fetch = ms(t.elapsed());
            Ok(bytes)
        }
    }
}

/// Classes to return for `spec`: the request's `top_k`, or the default capped at the class count.
fn top_k_for(spec: &ModelSpec, requested: Option<u32>, default: u32) -> Result<u32, ApiError> {
    let max_k = spec.classes.unwrap_or(u32::MAX);
    let top_k = requested.unwrap_or(default.min(max_k));
    if top_k == 0 || top_k > max_k {
        return Err(ApiError::BadRequest(format!(
            "top_k must be between 1 and {max_k}, got {top_k}"
        )));
    }
    Ok(top_k)
}

/// Decodes and then runs `step` (the model's preprocessing) on the blocking pool, at most
/// `max_concurrent_images` at a time, so big images neither stall the async workers nor use unbounded memory.
/// Returns what `step` made, and the time decoding and `step` took.
pub(crate) async fn prepare<T, F>(
    state: &AppState,
    bytes: Bytes,
    step: F,
) -> Result<(T, Duration, Duration), ApiError>
where
    T: Send + 'static,
    F: FnOnce(&RgbImage) -> Result<T, ApiError> + Send + 'static,
{
    let permit = state
        .images
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Internal("image workers shut down".into()))?;
    let max_pixels = state.config.max_image_pixels;
    let in_flight = state.metrics.image_started();
    let parent = tracing::Span::current();
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let t = Instant::now();
        let image = tracing::info_span!(parent: &parent, "decode")
            .in_scope(|| decode(&bytes, max_pixels))?;
        let decode_time = t.elapsed();
        let t = Instant::now();
        let made = tracing::info_span!(parent: &parent, "preprocess").in_scope(|| step(&image))?;
        Ok::<_, ApiError>((made, decode_time, t.elapsed()))
    })
    .await;
    drop(in_flight);
    result.map_err(|e| ApiError::Internal(format!("image worker failed: {e}")))?
}
