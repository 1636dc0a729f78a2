//! The model tier over gRPC (Open Inference Protocol), using the classification extension for a classifier's
//! labels and ModelConfig for a detector's: every replica discovered, each call balanced, retried on another
//! replica when it never reached a model.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::try_join_all;
use oip_proto::GrpcInferenceServiceClient;
use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::{
    InferParameter, ModelConfigRequest, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, RepositoryIndexRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

use super::discovery::{self, Resolve, SystemResolver, Target};
use super::metrics::UpstreamMetrics;
use super::pool::{self, Ejection, EndpointStatus, Pool};
use super::retry::{self, RetryBudget, RetryPolicy};
use super::{
    Classification, ClassifyRequest, DetectRequest, DetectedBox, Detections, ModelClient,
    ModelError, ModelKind, ModelSpec, Prediction, RepositoryEntry, VersionState,
};
use crate::Config;

/// Room for a large top-k answer; the default of 4 MiB is plenty for one image but not for everything.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How the client finds, balances over and retries the model-server replicas.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Names or addresses of the model tier, each resolved to every replica behind it.
    pub targets: Vec<Target>,
    /// Deadline of one call, retries included; sent as `grpc-timeout`.
    pub timeout: Duration,
    /// How often the names are resolved again.
    pub discovery_interval: Duration,
    /// Retry attempts and budget.
    pub retry: RetryPolicy,
    /// When a failing replica is taken out of rotation.
    pub ejection: Ejection,
    /// TLS of the connections; plain text when None.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientOptions {
    /// Defaults for `address` (a comma-separated list) with the call deadline `timeout`.
    pub fn new(address: &str, timeout: Duration) -> Result<Self, String> {
        Ok(ClientOptions {
            targets: Target::parse_list(address)?,
            timeout,
            discovery_interval: Duration::from_secs(5),
            retry: RetryPolicy {
                max_attempts: 3,
                budget_percent: 20.0,
            },
            ejection: Ejection {
                after_failures: 3,
                cool_down: Duration::from_secs(10),
            },
            tls: None,
        })
    }

    /// The options the gateway's configuration asks for.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let targets = Target::parse_list(&config.model_server)?;
        Ok(ClientOptions {
            tls: super::tls::client_config(config, &targets)?,
            targets,
            timeout: config.inference_timeout(),
            discovery_interval: Duration::from_millis(config.discovery_interval_ms),
            retry: RetryPolicy {
                max_attempts: config.max_attempts,
                budget_percent: config.retry_budget_percent,
            },
            ejection: Ejection {
                after_failures: config.eject_after_failures,
                cool_down: Duration::from_millis(config.eject_cool_down_ms),
            },
        })
    }
}

/// [`ModelClient`] over one connection per model-server replica, with discovery, balancing and retries.
#[derive(Clone)]
pub struct GrpcModelClient {
    pool: Arc<Pool>,
    budget: Arc<RetryBudget>,
    options: Arc<ClientOptions>,
    metrics: UpstreamMetrics,
}

impl GrpcModelClient {
    /// A client for `address` (comma-separated `http://host:port` names) with default balancing and
    /// retries. It connects on first use, so the gateway starts before the model tier. Needs a tokio
    /// runtime: it starts the discovery task.
    pub fn connect_lazy(address: &str, timeout: Duration) -> anyhow::Result<Self> {
        let options = ClientOptions::new(address, timeout).map_err(anyhow::Error::msg)?;
        Ok(Self::start(options, Arc::new(SystemResolver)))
    }

    /// A client resolving its targets with `resolver` every `discovery_interval`; the discovery task
    /// ends when the last clone of the client is dropped.
    pub fn start(options: ClientOptions, resolver: Arc<dyn Resolve>) -> Self {
        // The names are fixed and valid, so this cannot fail.
        let metrics = UpstreamMetrics::new().expect("valid metric names");
        let pool = Arc::new(Pool::new(
            options.ejection,
            pool::connector(options.tls.clone()),
        ));
        discovery::spawn(
            options.targets.clone(),
            resolver,
            options.discovery_interval,
            Arc::downgrade(&pool),
        );
        GrpcModelClient {
            pool,
            budget: Arc::new(RetryBudget::new(options.retry.budget_percent)),
            options: Arc::new(options),
            metrics,
        }
    }

    /// The replicas known now, with their load and whether they are ejected.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.pool.status()
    }

    /// Replicas ejected since start.
    pub fn ejections(&self) -> u64 {
        self.pool.ejections()
    }

    /// Calls one replica after another until one answers, the error is final, the attempts or the
    /// retry budget run out, or the deadline passes. Each attempt carries the time left as its
    /// `grpc-timeout`, so the server can drop work nobody waits for.
    async fn call<M, T, F, Fut>(
        &self,
        message: M,
        request_id: Option<&str>,
        rpc: F,
    ) -> Result<T, ModelError>
    where
        M: Clone,
        F: Fn(GrpcInferenceServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let timeout = self.options.timeout;
        let deadline = Instant::now() + timeout;
        let late = || {
            ModelError::DeadlineExceeded(format!(
                "the model server did not answer within {} ms",
                timeout.as_millis()
            ))
        };
        self.budget.deposit();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            let Some(endpoint) = self.pool.pick(&tried) else {
                // Discovery has not found a replica yet: wait for it rather than fail at once.
                self.pool.wait_for_endpoints(left).await;
                if self.pool.status().is_empty() {
                    return Err(ModelError::Unavailable(
                        "no model-server replica is known yet".into(),
                    ));
                }
                continue;
            };
            attempt += 1;
            let span = tracing::info_span!("model_call", endpoint = %endpoint.addr(), attempt);
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(left);
            if let Some(id) = request_id.and_then(|id| id.parse().ok()) {
                request.metadata_mut().insert("x-request-id", id);
            }
            // The replica's spans become children of this attempt.
            observability::inject_grpc(&span, request.metadata_mut());
            let client = GrpcInferenceServiceClient::new(endpoint.channel())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let in_flight = endpoint.start();
            let result = tokio::time::timeout(left, rpc(client, request))
                .instrument(span)
                .await;
            drop(in_flight);
            let status = match result {
                Ok(Ok(response)) => {
                    self.pool.succeeded(&endpoint);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    self.metrics.failed(Code::DeadlineExceeded);
                    return Err(late());
                }
            };
            self.metrics.failed(status.code());
            if !retry::is_retryable(&status) {
                // The replica answered: it is alive, whatever it said.
                self.pool.succeeded(&endpoint);
                return Err(from_status(&status));
            }
            self.pool.failed(&endpoint);
            tried.push(endpoint.addr());
            if attempt >= self.options.retry.max_attempts || !self.budget.withdraw() {
                return Err(from_status(&status));
            }
            let pause = retry::backoff(attempt, self.pool.random());
            if pause >= deadline.saturating_duration_since(Instant::now()) {
                return Err(from_status(&status));
            }
            tracing::debug!(endpoint = %endpoint.addr(), attempt, code = ?status.code(), error = %status.message(), pause_ms = pause.as_millis() as u64, "retrying on another replica");
            self.metrics.retried();
            tokio::time::sleep(pause).await;
        }
    }
}

impl GrpcModelClient {
    /// Runs `images` in calls of at most `limit` images side by side, and joins their answers in order.
    async fn in_batches<T>(
        &self,
        images: Vec<Vec<u8>>,
        limit: Option<usize>,
        message: impl Fn(Vec<Vec<u8>>) -> ModelInferRequest,
        answers: impl Fn(&ModelInferResponse, usize) -> Result<Vec<T>, ModelError>,
    ) -> Result<Vec<T>, ModelError> {
        let answers = &answers;
        let calls = chunks(images, limit).map(|images| {
            let batch = images.len();
            let message = message(images);
            async move { answers(&self.infer(message).await?, batch) }
        });
        Ok(try_join_all(calls).await?.into_iter().flatten().collect())
    }

    /// One ModelInfer call, its request id passed on for correlating logs.
    async fn infer(&self, message: ModelInferRequest) -> Result<ModelInferResponse, ModelError> {
        let id = message.id.clone();
        self.call(message, Some(&id), |mut client, request| async move {
            client.model_infer(request).await
        })
        .await
    }
}

#[async_trait]
impl ModelClient for GrpcModelClient {
    async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError> {
        let message = ModelMetadataRequest {
            name: model.into(),
            version: version.into(),
        };
        let metadata = self
            .call(message, None, |mut client, request| async move {
                client.model_metadata(request).await
            })
            .await?;
        let mut spec = spec_from_metadata(model, version, &metadata)?;
        // The batch limit, and a detector's class names (its boxes' classes are indices), are in the model's
        // configuration.
        let message = ModelConfigRequest {
            name: model.into(),
            version: version.into(),
        };
        let config = self
            .call(message, None, |mut client, request| async move {
                client.model_config(request).await
            })
            .await?
            .config
            .unwrap_or_default();
        spec.max_batch_size = usize::try_from(config.max_batch_size)
            .ok()
            .filter(|&n| n > 0);
        if spec.kind == ModelKind::Detection {
            let labels = config
                .parameters
                .get("labels")
                .map(|p| p.string_value.lines().map(str::to_owned).collect())
                .unwrap_or_default();
            spec.labels = Arc::new(labels);
        }
        Ok(spec)
    }

    async fn ready(&self, model: &str, version: &str) -> Result<bool, ModelError> {
        let message = ModelReadyRequest {
            name: model.into(),
            version: version.into(),
        };
        let response = self
            .call(message, None, |mut client, request| async move {
                client.model_ready(request).await
            })
            .await?;
        Ok(response.ready)
    }

    async fn classify(&self, request: ClassifyRequest) -> Result<Vec<Classification>, ModelError> {
        let ClassifyRequest {
            spec,
            images,
            top_k,
            request_id,
        } = request;
        let message = |images| {
            infer_request(ClassifyRequest {
                spec: spec.clone(),
                images,
                top_k,
                request_id: request_id.clone(),
            })
        };
        let answers = |response: &ModelInferResponse, batch| {
            classification_from_response(&spec, response, batch)
        };
        self.in_batches(images, spec.max_batch_size, message, answers)
            .await
    }

    async fn detect(&self, request: DetectRequest) -> Result<Vec<Detections>, ModelError> {
        let DetectRequest {
            spec,
            images,
            min_score,
            request_id,
        } = request;
        let message = |images| {
            detect_request(DetectRequest {
                spec: spec.clone(),
                images,
                min_score,
                request_id: request_id.clone(),
            })
        };
        let answers =
            |response: &ModelInferResponse, batch| detections_from_response(&spec, response, batch);
        self.in_batches(images, spec.max_batch_size, message, answers)
            .await
    }

    async fn repository(&self) -> Result<Vec<RepositoryEntry>, ModelError> {
        // Every repository and every state: loading and unloading versions are what a rollout is about.
        let message = RepositoryIndexRequest::default();
        let index = self
            .call(message, None, |mut client, request| async move {
                client.repository_index(request).await
            })
            .await?;
        Ok(index
            .models
            .into_iter()
            .map(|m| RepositoryEntry {
                state: VersionState::parse(&m.state),
                model: m.name,
                version: m.version,
            })
            .collect())
    }

    fn collectors(&self) -> Result<Vec<Box<dyn prometheus::core::Collector>>, prometheus::Error> {
        self.metrics.collectors(self.pool.clone())
    }
}

/// Maps a gRPC status to the gateway's model error, by the shared status table.
pub fn from_status(status: &Status) -> ModelError {
    let message = if status.message().is_empty() {
        format!("model server: {}", status.code())
    } else {
        format!("model server: {}", status.message())
    };
    match status.code() {
        Code::NotFound => ModelError::NotFound(message),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            ModelError::InvalidArgument(message)
        }
        Code::ResourceExhausted => ModelError::Overloaded(message),
        Code::Unavailable => ModelError::Unavailable(message),
        Code::DeadlineExceeded => ModelError::DeadlineExceeded(message),
        _ => ModelError::Other(message),
    }
}

/// A detector's outputs, in TensorRT EfficientNMS's layout: count `[N, 1]`, boxes `[N, K, 4]`, scores and classes
/// `[N, K]`.
const DETECTION_OUTPUTS: [&str; 4] = [
    "num_detections",
    "detection_boxes",
    "detection_scores",
    "detection_classes",
];

/// A batch cut into model calls of at most `limit` images, in order; one call when there is no limit. The calls
/// run side by side, so a replica set shares a large batch.
fn chunks(images: Vec<Vec<u8>>, limit: Option<usize>) -> impl Iterator<Item = Vec<Vec<u8>>> {
    let size = limit.unwrap_or(usize::MAX).max(1);
    let mut rest = images.into_iter().peekable();
    std::iter::from_fn(move || {
        rest.peek()?;
        Some(rest.by_ref().take(size).collect())
    })
}

/// Picks the UINT8 `[-1, H, W, 3]` input and the classification output out of the metadata; a model with
/// EfficientNMS's outputs is a detector.
pub fn spec_from_metadata(
    model: &str,
    version: &str,
    metadata: &ModelMetadataResponse,
) -> Result<ModelSpec, ModelError> {
    let input = metadata
        .inputs
        .iter()
        .find(|t| t.datatype == "UINT8" && t.shape.len() == 4 && t.shape[3] == 3 && t.shape[1] > 0 && t.shape[2] > 0)
        .ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model {model} has no UINT8 input of shape [-1, height, width, 3], which the gateway sends"
            ))
        })?;
    let is_detector = DETECTION_OUTPUTS
        .iter()
        .all(|name| metadata.outputs.iter().any(|t| t.name == *name));
    if is_detector {
        return Ok(ModelSpec {
            name: model.to_owned(),
            version: version.to_owned(),
            versions: metadata.versions.clone(),
            input: input.name.clone(),
            height: u32::try_from(input.shape[1]).unwrap_or(0),
            width: u32::try_from(input.shape[2]).unwrap_or(0),
            kind: ModelKind::Detection,
            ..Default::default()
        });
    }
    let output = metadata
        .outputs
        .iter()
        .find(|t| t.name == "probabilities")
        .or_else(|| metadata.outputs.iter().find(|t| t.datatype == "FP32"))
        .ok_or_else(|| {
            ModelError::Unsupported(format!("model {model} has no FP32 output to classify with"))
        })?;
    let classes = output
        .shape
        .last()
        .and_then(|&n| u32::try_from(n).ok())
        .filter(|&n| n > 0);
    Ok(ModelSpec {
        name: model.to_owned(),
        version: version.to_owned(),
        versions: metadata.versions.clone(),
        input: input.name.clone(),
        height: u32::try_from(input.shape[1]).unwrap_or(0),
        width: u32::try_from(input.shape[2]).unwrap_or(0),
        output: output.name.clone(),
        classes,
        kind: ModelKind::Classification,
        labels: Arc::default(),
        max_batch_size: None,
    })
}

/// The images as one UINT8 `[N, H, W, 3]` input and its raw contents: the images' bytes one after another.
fn pixels_input(spec: &ModelSpec, images: Vec<Vec<u8>>) -> (InferInputTensor, Vec<u8>) {
    let batch = i64::try_from(images.len()).unwrap_or(i64::MAX);
    let input = InferInputTensor {
        name: spec.input.clone(),
        datatype: "UINT8".into(),
        shape: vec![batch, i64::from(spec.height), i64::from(spec.width), 3],
        parameters: HashMap::new(),
        contents: None,
    };
    // A single image, the common case, is sent without a copy.
    let raw = match <[Vec<u8>; 1]>::try_from(images) {
        Ok([only]) => only,
        Err(images) => images.concat(),
    };
    (input, raw)
}

/// The images as raw UINT8 NHWC, asking for the top-k classes of the classification output.
pub fn infer_request(request: ClassifyRequest) -> ModelInferRequest {
    let spec = &request.spec;
    let classification = InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(i64::from(request.top_k))),
    };
    let (input, raw) = pixels_input(spec, request.images);
    ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: spec.version.clone(),
        id: request.request_id,
        parameters: HashMap::new(),
        inputs: vec![input],
        outputs: vec![InferRequestedOutputTensor {
            name: spec.output.clone(),
            parameters: HashMap::from([("classification".to_owned(), classification)]),
        }],
        raw_input_contents: vec![raw],
    }
}

/// The letterboxed images as raw UINT8 NHWC, asking for the detector's four outputs.
pub fn detect_request(request: DetectRequest) -> ModelInferRequest {
    let spec = &request.spec;
    let mut parameters = HashMap::new();
    if let Some(score) = request.min_score {
        parameters.insert(
            "score_threshold".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(f64::from(score))),
            },
        );
    }
    let (input, raw) = pixels_input(spec, request.images);
    ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: spec.version.clone(),
        id: request.request_id,
        parameters,
        inputs: vec![input],
        outputs: DETECTION_OUTPUTS
            .iter()
            .map(|name| InferRequestedOutputTensor {
                name: (*name).to_owned(),
                parameters: HashMap::new(),
            })
            .collect(),
        raw_input_contents: vec![raw],
    }
}

/// Reads a detector's answer for `batch` images: per image, its first `num_detections` of the `K` rows of boxes,
/// scores and classes.
pub fn detections_from_response(
    spec: &ModelSpec,
    response: &ModelInferResponse,
    batch: usize,
) -> Result<Vec<Detections>, ModelError> {
    let bad =
        |why: String| ModelError::Other(format!("unexpected answer from the model server: {why}"));
    // Each output's raw little-endian 4-byte values, checked against its datatype.
    let values = |name: &str, datatype: &str| -> Result<Vec<[u8; 4]>, ModelError> {
        let position = response
            .outputs
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| bad(format!("no output named {name}")))?;
        if response.outputs[position].datatype != datatype {
            return Err(bad(format!(
                "output {name} is {}, not {datatype}",
                response.outputs[position].datatype
            )));
        }
        let raw = response
            .raw_output_contents
            .get(position)
            .ok_or_else(|| bad(format!("no raw contents for output {name}")))?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect())
    };
    let counts = values("num_detections", "INT32")?;
    let boxes = values("detection_boxes", "FP32")?;
    let scores = values("detection_scores", "FP32")?;
    let classes = values("detection_classes", "INT32")?;
    if batch == 0 || counts.len() != batch || !scores.len().is_multiple_of(batch) {
        return Err(bad(format!(
            "{} counts and {} scores for {batch} images",
            counts.len(),
            scores.len()
        )));
    }
    // Rows per image: every image is padded to the same K.
    let rows = scores.len() / batch;
    if boxes.len() != batch * rows * 4 || classes.len() != batch * rows {
        return Err(bad(format!(
            "{rows} scores per image but {} box values and {} classes for {batch} images",
            boxes.len(),
            classes.len()
        )));
    }
    counts
        .iter()
        .enumerate()
        .map(|(image, count)| {
            let count = i32::from_le_bytes(*count);
            let count = usize::try_from(count)
                .ok()
                .filter(|&c| c <= rows)
                .ok_or_else(|| bad(format!("num_detections is {count} of {rows} rows")))?;
            let boxes = (image * rows..image * rows + count)
                .map(|i| {
                    let class_id = i64::from(i32::from_le_bytes(classes[i]));
                    let label = usize::try_from(class_id)
                        .ok()
                        .and_then(|c| spec.labels.get(c).cloned())
                        .unwrap_or_else(|| class_id.to_string());
                    let coordinate = |k: usize| f32::from_le_bytes(boxes[i * 4 + k]);
                    DetectedBox {
                        class_id,
                        label,
                        score: f32::from_le_bytes(scores[i]),
                        bbox: [coordinate(0), coordinate(1), coordinate(2), coordinate(3)],
                    }
                })
                .collect();
            Ok(Detections {
                model: answered_or(&response.model_name, &spec.name),
                version: answered_or(&response.model_version, &spec.version),
                boxes,
            })
        })
        .collect()
}

/// What the server named, or what was asked for when it named nothing.
fn answered_or(answered: &str, asked: &str) -> String {
    if answered.is_empty() { asked } else { answered }.to_owned()
}

/// Reads the classification output for `batch` images: `[N, k]` BYTES elements
/// `"<probability>:<index>:<label>"`, raw or typed, `k` per image in image order.
pub fn classification_from_response(
    spec: &ModelSpec,
    response: &ModelInferResponse,
    batch: usize,
) -> Result<Vec<Classification>, ModelError> {
    let bad =
        |why: String| ModelError::Other(format!("unexpected answer from the model server: {why}"));
    let position = response
        .outputs
        .iter()
        .position(|t| t.name == spec.output)
        .ok_or_else(|| bad(format!("no output named {}", spec.output)))?;
    let output = &response.outputs[position];
    if output.datatype != "BYTES" {
        return Err(bad(format!(
            "output {} is {}, not the BYTES of the classification extension",
            output.name, output.datatype
        )));
    }
    let elements: Vec<Vec<u8>> = if response.raw_output_contents.is_empty() {
        output
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.clone())
            .unwrap_or_default()
    } else {
        let raw = response
            .raw_output_contents
            .get(position)
            .ok_or_else(|| bad("raw output contents missing".into()))?;
        split_raw_bytes(raw).ok_or_else(|| bad("malformed BYTES tensor".into()))?
    };
    let rows = output.shape.first().copied();
    if batch == 0
        || rows.is_some_and(|n| n != batch as i64)
        || !elements.len().is_multiple_of(batch)
    {
        return Err(bad(format!(
            "{} classes in shape {:?} for {batch} images",
            elements.len(),
            output.shape
        )));
    }
    let per_image = elements.len() / batch;
    (0..batch)
        .map(|image| &elements[image * per_image..(image + 1) * per_image])
        .map(|row| {
            let mut predictions = row
                .iter()
                .map(|e| {
                    parse_class(e).ok_or_else(|| {
                        bad(format!("malformed class `{}`", String::from_utf8_lossy(e)))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            predictions.sort_by(|a, b| b.probability.total_cmp(&a.probability));
            Ok(Classification {
                model: answered_or(&response.model_name, &spec.name),
                version: answered_or(&response.model_version, &spec.version),
                predictions,
            })
        })
        .collect()
}

/// Splits a raw BYTES tensor: each element is a 4-byte little-endian length, then the bytes.
fn split_raw_bytes(mut raw: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut elements = Vec::new();
    while !raw.is_empty() {
        let (len, rest) = raw.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let element = rest.get(..len)?;
        elements.push(element.to_vec());
        raw = &rest[len..];
    }
    Some(elements)
}

/// Parses `"<probability>:<index>[:<label>]"`; labels may contain colons and commas.
fn parse_class(element: &[u8]) -> Option<Prediction> {
    let text = std::str::from_utf8(element).ok()?;
    let mut parts = text.splitn(3, ':');
    let probability = parts.next()?.trim().parse::<f32>().ok()?;
    let index = parts.next()?.trim().parse::<i64>().ok()?;
    let label = parts
        .next()
        .map_or_else(|| index.to_string(), str::to_owned);
    Some(Prediction {
        label,
        index,
        probability,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_cut_at_the_limit_in_order() {
        let images: Vec<Vec<u8>> = (0..11u8).map(|i| vec![i]).collect();
        let sizes = |limit| {
            chunks(images.clone(), limit)
                .map(|c| c.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(Some(4)), [4, 4, 3]);
        assert_eq!(sizes(Some(11)), [11]);
        assert_eq!(sizes(None), [11]);
        assert_eq!(
            sizes(Some(0)),
            [1; 11],
            "a limit of 0 still sends every image"
        );
        let flat: Vec<Vec<u8>> = chunks(images.clone(), Some(3)).flatten().collect();
        assert_eq!(flat, images);
        assert_eq!(chunks(Vec::new(), Some(8)).count(), 0);
    }
    use oip_proto::inference::InferTensorContents;
    use oip_proto::inference::model_infer_response::InferOutputTensor;
    use oip_proto::inference::model_metadata_response::TensorMetadata;
    use std::sync::Arc;

    fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
        TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: "1".into(),
            versions: vec!["1".into()],
            input: "pixels".into(),
            height: 224,
            width: 224,
            output: "probabilities".into(),
            classes: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn metadata_gives_the_uint8_input_and_probabilities() {
        let metadata = ModelMetadataResponse {
            name: "m".into(),
            versions: vec!["1".into()],
            platform: "candle".into(),
            inputs: vec![
                tensor("input", "FP32", &[-1, 3, 224, 224]),
                tensor("pixels", "UINT8", &[-1, 224, 224, 3]),
            ],
            outputs: vec![
                tensor("logits", "FP32", &[-1, 1000]),
                tensor("probabilities", "FP32", &[-1, 1000]),
            ],
        };
        assert_eq!(spec_from_metadata("m", "1", &metadata).unwrap(), spec());

        let float_only = ModelMetadataResponse {
            inputs: vec![metadata.inputs[0].clone()],
            ..metadata
        };
        assert!(matches!(
            spec_from_metadata("m", "1", &float_only),
            Err(ModelError::Unsupported(_))
        ));
    }

    #[test]
    fn request_carries_raw_pixels_and_classification() {
        let request = infer_request(ClassifyRequest {
            spec: Arc::new(spec()),
            images: vec![vec![7; 224 * 224 * 3]],
            top_k: 5,
            request_id: "r1".into(),
        });
        assert_eq!(request.inputs[0].shape, vec![1, 224, 224, 3]);
        assert_eq!(request.inputs[0].datatype, "UINT8");
        assert_eq!(request.raw_input_contents[0].len(), 224 * 224 * 3);
        let parameter = &request.outputs[0].parameters["classification"];
        assert_eq!(
            parameter.parameter_choice,
            Some(ParameterChoice::Int64Param(5))
        );
        assert_eq!(request.id, "r1");
    }

    #[test]
    fn a_batch_is_one_input_with_the_images_one_after_another() {
        let images: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 224 * 224 * 3]).collect();
        let request = infer_request(ClassifyRequest {
            spec: Arc::new(spec()),
            images: images.clone(),
            top_k: 1,
            request_id: "r".into(),
        });
        assert_eq!(request.inputs.len(), 1);
        assert_eq!(request.inputs[0].shape, vec![3, 224, 224, 3]);
        assert_eq!(request.raw_input_contents, vec![images.concat()]);
        let detector = ModelSpec {
            kind: ModelKind::Detection,
            ..spec()
        };
        let request = detect_request(DetectRequest {
            spec: Arc::new(detector),
            images,
            min_score: None,
            request_id: "r".into(),
        });
        assert_eq!(request.inputs[0].shape, vec![3, 224, 224, 3]);
        assert_eq!(request.raw_input_contents[0].len(), 3 * 224 * 224 * 3);
    }

    #[test]
    fn a_batch_answer_is_split_k_classes_per_image_in_order() {
        let mut output = bytes_output(None);
        output.shape = vec![3, 2];
        let answer = response(
            output,
            vec![raw(&[
                "0.1:1:a", "0.9:2:b", "0.8:3:c", "0.2:4:d", "0.6:5:e", "0.4:6:f",
            ])],
        );
        let answers = classification_from_response(&spec(), &answer, 3).unwrap();
        let top: Vec<i64> = answers.iter().map(|a| a.predictions[0].index).collect();
        assert_eq!(top, [2, 3, 5]);
        assert!(answers.iter().all(|a| a.predictions.len() == 2));
        assert!(classification_from_response(&spec(), &answer, 2).is_err());
        assert!(classification_from_response(&spec(), &answer, 4).is_err());
    }

    fn detector_answer(counts: &[i32], rows: usize) -> ModelInferResponse {
        let n = counts.len();
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        };
        let le = |values: Vec<[u8; 4]>| values.concat();
        // Image i's row r has score i + r/10 and class 10 * i + r.
        let scores = (0..n * rows)
            .map(|j| ((j / rows) as f32 + (j % rows) as f32 / 10.0).to_le_bytes())
            .collect();
        let classes = (0..n * rows)
            .map(|j| ((j / rows) as i32 * 10 + (j % rows) as i32).to_le_bytes())
            .collect();
        ModelInferResponse {
            model_name: "yolo".into(),
            model_version: "1".into(),
            id: String::new(),
            parameters: HashMap::new(),
            outputs: vec![
                tensor("num_detections", "INT32", vec![n as i64, 1]),
                tensor("detection_boxes", "FP32", vec![n as i64, rows as i64, 4]),
                tensor("detection_scores", "FP32", vec![n as i64, rows as i64]),
                tensor("detection_classes", "INT32", vec![n as i64, rows as i64]),
            ],
            raw_output_contents: vec![
                le(counts.iter().map(|c| c.to_le_bytes()).collect()),
                vec![0; n * rows * 16],
                le(scores),
                le(classes),
            ],
        }
    }

    #[test]
    fn a_detector_batch_answer_gives_each_image_its_own_rows() {
        let answer = detector_answer(&[2, 0, 3], 3);
        let found = detections_from_response(&spec(), &answer, 3).unwrap();
        let classes: Vec<Vec<i64>> = found
            .iter()
            .map(|d| d.boxes.iter().map(|b| b.class_id).collect())
            .collect();
        assert_eq!(classes, [vec![0, 1], vec![], vec![20, 21, 22]]);
        assert!(detections_from_response(&spec(), &answer, 2).is_err());
        let too_many = detector_answer(&[4], 3);
        assert!(detections_from_response(&spec(), &too_many, 1).is_err());
    }

    fn raw(elements: &[&str]) -> Vec<u8> {
        elements
            .iter()
            .flat_map(|e| (e.len() as u32).to_le_bytes().into_iter().chain(e.bytes()))
            .collect()
    }

    fn response(output: InferOutputTensor, raw_contents: Vec<Vec<u8>>) -> ModelInferResponse {
        ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: String::new(),
            parameters: HashMap::new(),
            outputs: vec![output],
            raw_output_contents: raw_contents,
        }
    }

    fn bytes_output(contents: Option<InferTensorContents>) -> InferOutputTensor {
        InferOutputTensor {
            name: "probabilities".into(),
            datatype: "BYTES".into(),
            shape: vec![1, 2],
            parameters: HashMap::new(),
            contents,
        }
    }

    #[test]
    fn raw_classification_is_parsed_with_colons_in_labels() {
        let answer = response(
            bytes_output(None),
            vec![raw(&["0.25:1:a:b, c", "0.75:967:espresso"])],
        );
        let classification = classification_from_response(&spec(), &answer, 1)
            .unwrap()
            .remove(0);
        assert_eq!(
            classification.predictions[0],
            Prediction {
                label: "espresso".into(),
                index: 967,
                probability: 0.75
            }
        );
        assert_eq!(classification.predictions[1].label, "a:b, c");
        assert_eq!(classification.version, "1");
    }

    #[test]
    fn typed_classification_is_parsed() {
        let contents = InferTensorContents {
            bytes_contents: vec![b"0.9:3".to_vec()],
            ..Default::default()
        };
        let answer = response(bytes_output(Some(contents)), vec![]);
        let classification = classification_from_response(&spec(), &answer, 1)
            .unwrap()
            .remove(0);
        assert_eq!(
            classification.predictions,
            vec![Prediction {
                label: "3".into(),
                index: 3,
                probability: 0.9
            }]
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for contents in [vec![5, 0, 0, 0, b'a'], vec![1, 0], raw(&["x:y:z"])] {
            let answer = response(bytes_output(None), vec![contents]);
            assert!(classification_from_response(&spec(), &answer, 1).is_err());
        }
        let mut float = bytes_output(None);
        float.datatype = "FP32".into();
        assert!(
            classification_from_response(&spec(), &response(float, vec![vec![0; 8]]), 1).is_err()
        );
    }

    #[test]
    fn statuses_map_to_the_table() {
        type IsExpected = fn(&ModelError) -> bool;
        let cases: [(Status, IsExpected); 6] = [
            (Status::not_found("x"), |e| {
                matches!(e, ModelError::NotFound(_))
            }),
            (Status::invalid_argument("x"), |e| {
                matches!(e, ModelError::InvalidArgument(_))
            }),
            (Status::resource_exhausted("x"), |e| {
                matches!(e, ModelError::Overloaded(_))
            }),
            (Status::unavailable("x"), |e| {
                matches!(e, ModelError::Unavailable(_))
            }),
            (Status::deadline_exceeded("x"), |e| {
                matches!(e, ModelError::DeadlineExceeded(_))
            }),
            (Status::internal("x"), |e| matches!(e, ModelError::Other(_))),
        ];
        for (status, expected) in cases {
            assert!(
                expected(&from_status(&status)),
                "{:?} mapped wrongly",
                status.code()
            );
        }
    }
}
