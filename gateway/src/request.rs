//! Predict and detect request bodies: JSON (one image, or an `images` list) or a multipart form (one `image` file
//! or `url`, or several `image` files), read into a [`PredictInput`].

use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model_client::parse_version;
use crate::predict::{ImageSource, PredictInput};

/// Padding is optional: browsers and command-line tools disagree about it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The JSON form of a predict or detect request: one image as `url` or `image`, or several as `images`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictJson {
    /// An image URL the gateway fetches (http or https, public addresses unless allow-listed).
    url: Option<String>,
    /// An image's bytes in base64 (padding optional; a `data:` URL is accepted as it is).
    image: Option<String>,
    /// Several images, answered one result per image in this order (at most `--max-images-per-request`);
    /// not with `url` or `image`.
    images: Option<Vec<ImageJson>>,
    /// Classes returned per image (`POST /predict` only); the configured default when absent.
    #[schema(minimum = 1)]
    top_k: Option<u32>,
    /// Lowest score of a box returned, 0 to 1 (`POST /detect` only); the model's default when absent.
    #[schema(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f32>,
    /// Model name; the route's default model when absent.
    model: Option<String>,
    /// Model version, a positive integer as a string or a number; the configured or newest one when absent.
    // Any JSON value, read by `json_version`, so a wrong one gets a message saying what to send.
    #[schema(schema_with = version_schema)]
    version: Option<serde_json::Value>,
}

/// One image of a JSON `images` list: exactly one of `url` and `image`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageJson {
    /// An image URL the gateway fetches.
    url: Option<String>,
    /// The image's bytes in base64.
    image: Option<String>,
}

/// The multipart form of a predict or detect request, as its fields are read.
#[derive(Debug, Default, ToSchema)]
pub struct PredictForm {
    /// Image files: one for the single-image answer, several for one result per image in order.
    #[schema(value_type = Vec<String>, format = Binary, required = false)]
    image: Vec<Bytes>,
    /// An image URL the gateway fetches, instead of an `image` file.
    url: Option<String>,
    /// Model name.
    model: Option<String>,
    /// Model version, a positive integer.
    version: Option<String>,
    /// Classes returned per image (`POST /predict` only).
    #[schema(minimum = 1)]
    top_k: Option<u32>,
    /// Lowest score of a box returned (`POST /detect` only).
    #[schema(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f32>,
}

/// `version` in JSON: a positive integer, as a string or a number.
fn version_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
    let one_of = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]*[1-9][0-9]*$"))
                .examples(["2"]),
        )
        .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "Model version, a positive integer as a string or a number; the configured or newest one when absent.",
        ))
        .build();
    Schema::OneOf(one_of)
}

/// Reads a predict or detect request: multipart when it says so, JSON otherwise.
pub async fn parse_input(
    request: Request,
    limit: usize,
    max_images: usize,
) -> Result<PredictInput, ApiError> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if is_multipart {
        return parse_multipart(request, limit, max_images).await;
    }
    // Anything else is taken as JSON, so `curl -d '{"url": ...}'` works without a Content-Type.
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit }
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
    let parsed: PredictJson =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let version = json_version(parsed.version.as_ref())?;
    let (images, batch) = match (parsed.url, parsed.image, parsed.images) {
        (url, image, None) => (vec![Ok(json_source(url, image, limit)?)], false),
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err(ApiError::BadRequest(
                    "\"images\" is empty: send at least one {\"url\": ...} or {\"image\": ...}"
                        .into(),
                ));
            }
            if list.len() > max_images {
                return Err(ApiError::TooManyImages { limit: max_images });
            }
            // Each image stands alone: one that cannot be read gets its own error and leaves the others be.
            let images = list
                .into_iter()
                .map(|item| json_source(item.url, item.image, limit))
                .collect();
            (images, true)
        }
        (_, _, Some(_)) => {
            return Err(ApiError::BadRequest(
                "send either \"images\" or a single \"url\" or \"image\", not both".into(),
            ));
        }
    };
    Ok(PredictInput {
        images,
        batch,
        model: parsed.model,
        version,
        top_k: parsed.top_k,
        min_score: parsed.min_score,
    })
}

/// The one image a JSON object names with `url` or `image`.
fn json_source(
    url: Option<String>,
    image: Option<String>,
    limit: usize,
) -> Result<ImageSource, ApiError> {
    match (url, image) {
        (Some(url), None) => Ok(ImageSource::Url(url)),
        (None, Some(image)) => Ok(ImageSource::Bytes(decode_base64(&image, limit)?)),
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "send either \"url\" or \"image\", not both".into(),
        )),
        (None, None) => Err(missing_image()),
    }
}

async fn parse_multipart(
    request: Request,
    limit: usize,
    max_images: usize,
) -> Result<PredictInput, ApiError> {
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("invalid multipart form: {}", e.body_text())))?;
    let mut form = PredictForm::default();
    let too_large_or_bad = |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::BadRequest(format!("invalid multipart form: {}", e.body_text()))
        }
    };
    while let Some(field) = multipart.next_field().await.map_err(too_large_or_bad)? {
        match field.name().unwrap_or_default() {
            "image" => {
                // Refused before the next file is read: an oversized batch costs no more memory.
                if form.image.len() == max_images {
                    return Err(ApiError::TooManyImages { limit: max_images });
                }
                form.image
                    .push(field.bytes().await.map_err(too_large_or_bad)?);
            }
            "url" => form.url = Some(field.text().await.map_err(too_large_or_bad)?),
            "model" => form.model = Some(field.text().await.map_err(too_large_or_bad)?),
            "version" => form.version = Some(field.text().await.map_err(too_large_or_bad)?),
            "top_k" => {
                let text = field.text().await.map_err(too_large_or_bad)?;
                let k = text.trim().parse::<u32>().map_err(|_| {
                    ApiError::BadRequest(format!("top_k must be a positive integer, got `{text}`"))
                })?;
                form.top_k = Some(k);
            }
            "min_score" => {
                let text = field.text().await.map_err(too_large_or_bad)?;
                let score = text.trim().parse::<f32>().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "min_score must be a number between 0 and 1, got `{text}`"
                    ))
                })?;
                form.min_score = Some(score);
            }
            _ => {}
        }
    }
    form.into_input(limit)
}

impl PredictForm {
    /// The input the form's fields describe; several `image` files make a batch.
    fn into_input(self, limit: usize) -> Result<PredictInput, ApiError> {
        let version = match self.version {
            Some(text) => text_version(&text)?,
            None => None,
        };
        let url = self.url.filter(|u| !u.trim().is_empty());
        let mut files = self.image;
        let batch = files.len() > 1;
        let images = match (url, files.len()) {
            (Some(_), 1..) => {
                return Err(ApiError::BadRequest(
                    "send either image files or a url, not both".into(),
                ));
            }
            (Some(url), _) => vec![Ok(ImageSource::Url(url))],
            (None, 0) => return Err(missing_image()),
            // The single-image form fails as a whole, as it always has.
            (None, 1) => {
                let bytes = files.pop().ok_or_else(missing_image)?;
                vec![Ok(uploaded(bytes, limit)?)]
            }
            (None, _) => files
                .into_iter()
                .map(|bytes| uploaded(bytes, limit))
                .collect(),
        };
        Ok(PredictInput {
            images,
            batch,
            model: self.model.filter(|m| !m.trim().is_empty()),
            version,
            top_k: self.top_k,
            min_score: self.min_score,
        })
    }
}

/// An uploaded file as an image source, unless it is empty or over the limit.
fn uploaded(bytes: Bytes, limit: usize) -> Result<ImageSource, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("the image file is empty".into()));
    }
    if bytes.len() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    Ok(ImageSource::Bytes(bytes))
}

/// A version given as text: a positive decimal integer, returned without leading zeros; empty means
/// none was asked for, as with `model`.
fn text_version(text: &str) -> Result<Option<String>, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    parse_version(text)
        .map(|v| Some(v.to_string()))
        .ok_or_else(|| bad_version(text))
}

/// A version given in JSON: the same text as a string, or a positive integer as a number.
fn json_version(value: Option<&serde_json::Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => text_version(text),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .filter(|&v| v > 0)
            .map(|v| Some(v.to_string()))
            .ok_or_else(|| bad_version(&n.to_string())),
        Some(other) => Err(bad_version(&other.to_string())),
    }
}

fn bad_version(got: &str) -> ApiError {
    // Only the start is echoed: the field can be as long as the body.
    let got: String = got.chars().take(32).collect();
    ApiError::BadRequest(format!(
        "version must be a positive integer such as \"2\" (GET /v1/models lists the versions served), got `{got}`"
    ))
}

fn missing_image() -> ApiError {
    ApiError::BadRequest(
        "no image: send JSON {\"url\": \"https://...\"}, {\"image\": \"<base64>\"} or {\"images\": [...]}, or a multipart form with one or more `image` files"
            .into(),
    )
}

fn decode_base64(text: &str, limit: usize) -> Result<Bytes, ApiError> {
    // Data URLs from a browser's FileReader are accepted as they are.
    let text = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    let text = text.trim();
    if text.len() / 4 * 3 > limit + 3 {
        return Err(ApiError::TooLarge { limit });
    }
    let bytes = BASE64
        .decode(text)
        .map_err(|e| ApiError::BadRequest(format!("\"image\" is not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("\"image\" is empty".into()));
    }
    if bytes.len() > limit {
        return Err(ApiError::TooLarge { limit });
    }
    Ok(bytes.into())
}
