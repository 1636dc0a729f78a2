//! Detection: image bytes or URLs in, boxes in each original image's pixels and per-phase timings out.

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::batch::{self, Answer};
use crate::error::ApiError;
use crate::model_client::{DetectRequest, ModelKind};
use crate::predict::{ModelRef, PredictInput, Timings, check_kind, resolve_model};
use crate::preprocess::{LETTERBOX_FILL, letterbox};

/// The detect answer for one image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetectResponse {
    /// Model that answered.
    pub model: ModelRef,
    /// The image as the boxes see it: after its EXIF orientation.
    pub image: ImageSize,
    /// Highest score first.
    pub detections: Vec<Detection>,
    /// Milliseconds per phase.
    pub timings_ms: Timings,
    /// The request id, also in the `x-request-id` header.
    pub request_id: String,
}

/// Width and height in pixels.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ImageSize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// One object found.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Detection {
    /// Class name.
    pub label: String,
    /// Class index in the model's labels.
    pub class_id: i64,
    /// Confidence, 0 to 1.
    pub score: f32,
    /// Corners in the original image's pixels.
    #[serde(rename = "box")]
    pub bbox: BoundingBox,
}

/// Top-left and bottom-right corners, in pixels.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct BoundingBox {
    /// Left edge.
    pub x1: f64,
    /// Top edge.
    pub y1: f64,
    /// Right edge.
    pub x2: f64,
    /// Bottom edge.
    pub y2: f64,
}

/// Runs the whole detection pipeline for the request's images, as one batch on the model tier; the caller holds
/// its place from [`admit`](crate::predict::admit).
pub async fn detect(
    state: &AppState,
    input: PredictInput,
    request_id: &str,
) -> Result<Answer<DetectResponse>, ApiError> {
    let started = Instant::now();
    if input.top_k.is_some() {
        return Err(ApiError::BadRequest(
            "top_k is for classifiers (POST /predict); POST /detect takes min_score".into(),
        ));
    }
    let min_score = input.min_score;
    if let Some(score) = min_score
        && !(0.0..=1.0).contains(&score)
    {
        return Err(ApiError::BadRequest(format!(
            "min_score must be between 0 and 1, got {score}"
        )));
    }
    // `--model-version` pins the classifier; a detector follows its newest version unless a request names one.
    let (model, version) = resolve_model(&input, &state.config.default_detection_model, "");
    let spec = state.catalog.spec(&model, &version).await?;
    check_kind(&spec, ModelKind::Detection)?;

    let fetched = batch::fetch_all(state, input.images, started).await;
    // Each image keeps where it landed in the input that answered, and its size, to map the boxes back.
    let outcomes = batch::infer(
        state,
        (&model, &version),
        spec,
        fetched,
        |spec| {
            let (height, width) = (spec.height, spec.width);
            move |image: &RgbImage| {
                let size = ImageSize {
                    width: image.width(),
                    height: image.height(),
                };
                let (pixels, letterboxed) = letterbox(image, height, width, LETTERBOX_FILL)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                Ok((pixels, (letterboxed, size)))
            }
        },
        |spec, images| {
            Ok(DetectRequest {
                spec,
                images,
                min_score,
                request_id: request_id.to_owned(),
            })
        },
    )
    .await?;
    let results = outcomes
        .into_iter()
        .map(|(outcome, timings)| {
            outcome.map(|((letterboxed, size), answer)| {
                let detections = answer
                    .boxes
                    .into_iter()
                    .map(|b| {
                        let [x1, y1, x2, y2] =
                            letterboxed.to_original(b.bbox, size.width, size.height);
                        Detection {
                            label: b.label,
                            class_id: b.class_id,
                            score: b.score,
                            bbox: BoundingBox {
                                x1: round2(x1),
                                y1: round2(y1),
                                x2: round2(x2),
                                y2: round2(y2),
                            },
                        }
                    })
                    .collect();
                DetectResponse {
                    model: ModelRef {
                        name: answer.model,
                        version: answer.version,
                    },
                    image: size,
                    detections,
                    timings_ms: timings,
                    request_id: request_id.to_owned(),
                }
            })
        })
        .collect();
    batch::answer(input.batch, results)
}

/// Hundredths of a pixel are plenty, and keep the JSON short.
fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
