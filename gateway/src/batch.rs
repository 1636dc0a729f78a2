//! Several images in one request: fetched at once, decoded and preprocessed at once, run on the model tier in as
//! few calls as its max batch size allows, and answered one result per image in the order sent. An image that
//! fails gets its own error and leaves the others be; a failed model call fails them all.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use image::RgbImage;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorDetail, Severity};
use crate::model_client::{Call, ModelError, ModelSpec};
use crate::predict::{ImageSource, Timings, fetch_image, ms, prepare};

/// The answer to a predict or detect request: one object for the single-image forms, one result per image for
/// an `images` list or several multipart `image` files.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Answer<T> {
    /// The request named one image with `url`, `image` or one multipart file.
    One(T),
    /// The request carried a list of images.
    Batch(BatchResponse<T>),
}

/// One result per image, in the order the request sent them.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse<T> {
    /// As many as the request's images, in their order.
    pub results: Vec<BatchResult<T>>,
}

/// One image's result: the object a request of that image alone gets, or its error.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchResult<T> {
    /// The image's answer.
    Ok(T),
    /// Why this image has no answer.
    Failed(ImageFailure),
}

/// Why one image of a batch has no answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageFailure {
    /// The error a request of this image alone would have got.
    pub error: ErrorDetail,
    /// That request's HTTP status: 422 for an image that does not decode, 400 for bad base64, ...
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
}

impl From<ApiError> for ImageFailure {
    fn from(error: ApiError) -> Self {
        let (status, code, severity) = error.classify();
        let message = error.to_string();
        // The response is a 200, so the request middleware logs nothing about the image: say it here.
        if severity == Severity::Client {
            tracing::debug!(code, %message, "an image of the batch failed");
        } else {
            tracing::warn!(code, %message, "an image of the batch failed");
        }
        ImageFailure {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
            },
            status: status.as_u16(),
        }
    }
}

/// The answer for `results`, one per image: the single-image forms get their one result or fail with its error.
pub(crate) fn answer<T>(
    batch: bool,
    results: Vec<Result<T, ApiError>>,
) -> Result<Answer<T>, ApiError> {
    if batch {
        let results = results
            .into_iter()
            .map(|r| r.map_or_else(|e| BatchResult::Failed(e.into()), BatchResult::Ok))
            .collect();
        return Ok(Answer::Batch(BatchResponse { results }));
    }
    results
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("a request without an image got through".into()))?
        .map(Answer::One)
}

/// The images of a request after fetching: their bytes or why not, and each one's timings so far.
pub(crate) struct Fetched {
    bytes: Vec<Result<Bytes, ApiError>>,
    timings: Vec<Timings>,
    started: Instant,
}

/// Fetches every image at once; `started` is when the request began.
pub(crate) async fn fetch_all(
    state: &AppState,
    sources: Vec<Result<ImageSource, ApiError>>,
    started: Instant,
) -> Fetched {
    let fetched = join_all(sources.into_iter().map(|source| async move {
        let mut timings = Timings::default();
        let bytes = match source {
            Ok(source) => fetch_image(state, source, &mut timings).await,
            Err(e) => Err(e),
        };
        (bytes, timings)
    }))
    .await;
    let (bytes, timings) = fetched.into_iter().unzip();
    Fetched {
        bytes,
        timings,
        started,
    }
}

/// Per image: what preparing it kept besides its pixels and the model's answer, with its timings; or its error.
pub(crate) type Outcome<E, A> = (Result<(E, A), ApiError>, Timings);

/// Prepares every fetched image with the step `step_for` gives for the model's spec, sends the prepared ones in
/// one request made by `make`, and pairs each answer with its image. The catalog may prepare the images twice
/// (a version replaced under the first call); what the answers need comes from the preparation that was sent.
pub(crate) async fn infer<E, A, Q, S, F, M>(
    state: &AppState,
    (model, version): (&str, &str),
    spec: Arc<ModelSpec>,
    fetched: Fetched,
    step_for: S,
    make: M,
) -> Result<Vec<Outcome<E, A>>, ApiError>
where
    E: Send + 'static,
    Q: Call<Answer = Vec<A>>,
    S: Fn(&ModelSpec) -> F,
    F: FnOnce(&RgbImage) -> Result<(Vec<u8>, E), ApiError> + Clone + Send + 'static,
    M: Fn(Arc<ModelSpec>, Vec<Vec<u8>>) -> Result<Q, ApiError>,
{
    let Fetched {
        bytes,
        mut timings,
        started,
    } = fetched;
    let phases = Phases::new(bytes.len());
    let kept: Mutex<Vec<Option<Result<E, ApiError>>>> = Mutex::new(Vec::new());
    let call = Instant::now();
    let answers = state
        .catalog
        .run(model, version, spec, |spec| {
            let (bytes, phases, kept, make) = (&bytes, &phases, &kept, &make);
            let step = step_for(&spec);
            async move {
                let t = Instant::now();
                let prepared = join_all(bytes.iter().map(|b| {
                    let step = step.clone();
                    async move {
                        match b {
                            Ok(b) => Some(prepare(state, b.clone(), step).await),
                            Err(_) => None,
                        }
                    }
                }))
                .await;
                phases.waited(t.elapsed());
                let mut images = Vec::new();
                let outcomes = prepared
                    .into_iter()
                    .enumerate()
                    .map(|(i, prepared)| {
                        prepared.map(|p| {
                            p.map(|((pixels, extra), decode, preprocess)| {
                                phases.record(state, i, decode, preprocess);
                                images.push(pixels);
                                extra
                            })
                        })
                    })
                    .collect();
                *lock(kept) = outcomes;
                make(spec, images)
            }
        })
        .await?;
    let kept = kept.into_inner().unwrap_or_else(|p| p.into_inner());
    let sent = kept.iter().filter(|k| matches!(k, Some(Ok(_)))).count();
    if answers.len() != sent {
        return Err(ModelError::Other(format!(
            "unexpected answer from the model server: {} answers for {sent} images",
            answers.len()
        ))
        .into());
    }
    if sent > 0 {
        phases.finish(state, call, started, &mut timings);
    }
    let mut answers = answers.into_iter();
    let mut kept = kept.into_iter();
    Ok(bytes
        .into_iter()
        .zip(timings)
        .map(|(bytes, timings)| {
            let outcome = match (bytes, kept.next().flatten()) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(Err(e))) => Err(e),
                (Ok(_), Some(Ok(extra))) => answers
                    .next()
                    .map(|answer| (extra, answer))
                    .ok_or_else(|| ApiError::Internal("an image lost its answer".into())),
                (Ok(_), None) => Err(ApiError::Internal("an image was never prepared".into())),
            };
            (outcome, timings)
        })
        .collect())
}

/// Time spent per image and preparing the batch, over every preparation the catalog asked for.
#[derive(Debug, Default)]
struct Spent {
    /// Decoding and preprocessing, per image.
    per_image: Vec<(Duration, Duration)>,
    /// The wall-clock time the batch took to prepare, waits for image workers included.
    preparing: Duration,
}

/// The phases of one batch's call to the model tier: the preparation is kept apart from the model tier's time.
#[derive(Debug)]
struct Phases(Mutex<Spent>);

impl Phases {
    fn new(images: usize) -> Self {
        Phases(Mutex::new(Spent {
            per_image: vec![(Duration::ZERO, Duration::ZERO); images],
            preparing: Duration::ZERO,
        }))
    }

    /// Counts one image's decoding and preprocessing.
    fn record(&self, state: &AppState, image: usize, decode: Duration, preprocess: Duration) {
        state.metrics.phase("decode", decode);
        state.metrics.phase("preprocess", preprocess);
        if let Some(spent) = lock(&self.0).per_image.get_mut(image) {
            spent.0 += decode;
            spent.1 += preprocess;
        }
    }

    /// Counts the wall-clock time of one preparation of the whole batch.
    fn waited(&self, preparing: Duration) {
        lock(&self.0).preparing += preparing;
    }

    /// Fills every image's `timings` for a call to the model tier started at `call` by a request started at
    /// `started`.
    fn finish(&self, state: &AppState, call: Instant, started: Instant, timings: &mut [Timings]) {
        let spent = lock(&self.0);
        let inference = call.elapsed().saturating_sub(spent.preparing);
        state.metrics.phase("inference", inference);
        let total = started.elapsed();
        state.metrics.phase("total", total);
        for (timings, (decode, preprocess)) in timings.iter_mut().zip(&spent.per_image) {
            timings.decode = ms(*decode);
            timings.preprocess = ms(*preprocess);
            timings.inference = ms(inference);
            timings.total = ms(total);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain values: a panicking holder leaves nothing inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
