//! A fake model tier and request helpers shared by the integration tests.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, Response};
use gateway::model_client::{
    Classification, ClassifyRequest, ModelClient, ModelError, ModelSpec, Prediction,
    RepositoryEntry, VersionState,
};
use gateway::{AppState, Config};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::Semaphore;

/// The model tier as the contract describes it, in memory: one known model, answers made up from the
/// request, and knobs for every failure.
pub struct FakeModel {
    /// Returned by `classify` instead of an answer.
    pub classify_error: Mutex<Option<ModelError>>,
    /// Returned by `ready`.
    pub ready: Mutex<Result<bool, ModelError>>,
    /// Requests seen by `classify`.
    pub seen: Mutex<Vec<ClassifyRequest>>,
    /// When set, `classify` waits for a permit: lets a test hold requests in flight.
    pub gate: Option<Arc<Semaphore>>,
    /// Calls of `classify` so far, counted before waiting at the gate.
    pub entered: AtomicUsize,
    /// When set, each image's top class index is its first pixel's red value, so a test can tell the answers
    /// of a batch apart.
    pub index_by_color: bool,
}

impl FakeModel {
    pub fn new() -> Self {
        FakeModel {
            classify_error: Mutex::new(None),
            ready: Mutex::new(Ok(true)),
            seen: Mutex::new(Vec::new()),
            gate: None,
            entered: AtomicUsize::new(0),
            index_by_color: false,
        }
    }

    pub fn failing(error: ModelError) -> Self {
        let fake = FakeModel::new();
        *fake.classify_error.lock().unwrap() = Some(error);
        fake
    }
}

pub const LABELS: [&str; 6] = [
    "espresso",
    "cup",
    "consomme",
    "chocolate sauce, chocolate syrup",
    "coffee mug",
    "eggnog",
];

#[async_trait]
impl ModelClient for FakeModel {
    async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError> {
        match model {
            "efficientnet-lite0" | "other-model" => Ok(ModelSpec {
                name: model.into(),
                version: version.into(),
                versions: vec!["1".into()],
                input: "pixels".into(),
                height: 224,
                width: 224,
                output: "probabilities".into(),
                classes: Some(1000),
                ..Default::default()
            }),
            _ => Err(ModelError::NotFound(format!(
                "model server: model {model} not found"
            ))),
        }
    }

    async fn ready(&self, _model: &str, _version: &str) -> Result<bool, ModelError> {
        self.ready.lock().unwrap().clone()
    }

    async fn classify(&self, request: ClassifyRequest) -> Result<Vec<Classification>, ModelError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await.unwrap();
        }
        assert!(
            !request.images.is_empty(),
            "an empty batch reached the model"
        );
        for image in &request.images {
            assert_eq!(
                image.len(),
                (request.spec.height * request.spec.width * 3) as usize
            );
        }
        self.seen.lock().unwrap().push(request.clone());
        if let Some(error) = self.classify_error.lock().unwrap().clone() {
            return Err(error);
        }
        let answer = |pixels: &Vec<u8>| {
            let first = if self.index_by_color {
                i64::from(pixels[0])
            } else {
                967
            };
            let predictions = (0..request.top_k as usize)
                .map(|i| Prediction {
                    label: LABELS[i % LABELS.len()].into(),
                    index: first + i as i64,
                    probability: 0.9 / (i as f32 + 1.0),
                })
                .collect();
            Classification {
                model: request.spec.name.clone(),
                version: "1".into(),
                predictions,
            }
        };
        Ok(request.images.iter().map(answer).collect())
    }

    async fn repository(&self) -> Result<Vec<RepositoryEntry>, ModelError> {
        Ok(["efficientnet-lite0", "other-model"]
            .into_iter()
            .map(|model| RepositoryEntry {
                model: model.into(),
                version: "1".into(),
                state: VersionState::Ready,
            })
            .collect())
    }
}

/// A config from flags only, as the binary would parse them.
pub fn config(flags: &[&str]) -> Config {
    let mut args = vec!["gateway"];
    args.extend_from_slice(flags);
    <Config as clap::Parser>::try_parse_from(args).unwrap()
}

pub fn app_with(fake: Arc<FakeModel>, flags: &[&str]) -> axum::Router {
    gateway::app(AppState::new(config(flags), fake).unwrap())
}

/// The response status, headers and body parsed as JSON.
pub async fn json_of(response: Response<Body>) -> (u16, axum::http::HeaderMap, Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, value)
}

pub fn post_json(body: impl Into<String>) -> Request<Body> {
    Request::post("/predict")
        .header("content-type", "application/json")
        .body(Body::from(body.into()))
        .unwrap()
}

/// A multipart body with the given (name, filename, bytes) parts, and its content type.
pub fn multipart_body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----gateway-test-boundary";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `POST /predict` with a multipart body of the given (name, filename, bytes) parts.
pub fn post_multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let (content_type, body) = multipart_body(parts);
    Request::post("/predict")
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap()
}

pub fn golden_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/golden")
        .join(name)
}

pub fn golden_png(name: &str) -> Vec<u8> {
    std::fs::read(golden_path(&format!("{name}.png"))).unwrap()
}

/// The detector's golden photos (testdata/yolo/images/), whose reference detections are in
/// testdata/yolo/detections.json.
pub const YOLO_PHOTOS: [&str; 4] = ["camera", "coffee", "motorcycle_left", "clock_motion"];

/// The detector's testdata directory.
pub fn yolo_testdata() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/yolo")
}

/// One of the detector's golden photos, as its original file.
pub fn yolo_png(name: &str) -> Vec<u8> {
    std::fs::read(yolo_testdata().join("images").join(format!("{name}.png"))).unwrap()
}

/// A PNG of one color, `red` in its red channel: what [`FakeModel::index_by_color`] answers with.
pub fn solid_png(red: u8) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(40, 30, image::Rgb([red, 64, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A small valid PNG.
pub fn small_png() -> Vec<u8> {
    let image =
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The first bytes of a PNG announcing `width` x `height`, with a valid IHDR and a token IDAT: enough
/// for a decoder to read the size, far too little to decode.
pub fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

pub mod load;
pub mod oip;
pub mod prom;
pub mod stack;
