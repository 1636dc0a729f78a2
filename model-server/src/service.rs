//! `inference.GRPCInferenceService`: the Open Inference Protocol endpoints.

use std::sync::Arc;

use oip_proto::GrpcInferenceService;
use oip_proto::inference::model_metadata_response::TensorMetadata;
use oip_proto::inference::repository_index_response::ModelIndex;
use oip_proto::inference::{
    DataType, ModelConfig, ModelConfigRequest, ModelConfigResponse, ModelDynamicBatching,
    ModelInferRequest, ModelInferResponse, ModelInput, ModelInstanceGroup, ModelMetadataRequest,
    ModelMetadataResponse, ModelOutput, ModelParameter, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, RepositoryIndexRequest,
    RepositoryIndexResponse, RepositoryModelLoadRequest, RepositoryModelLoadResponse,
    RepositoryModelUnloadRequest, RepositoryModelUnloadResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, model_input, model_instance_group,
    model_repository_parameter::ParameterChoice,
};
use tonic::{Request, Response, Status};

use crate::backend::Kind;
use crate::codec::{self, Output};
use crate::error::{InferError, invalid};
use crate::lifecycle::Lifecycle;
use crate::registry::{IndexEntry, Registry};
use crate::repository::{ConfigOverride, VersionConfig};
use crate::stats::{Failure, Stats};

/// Name reported by ServerMetadata.
pub const SERVER_NAME: &str = "model-server";

/// Protocol extensions this server implements, as ServerMetadata lists them.
pub const EXTENSIONS: [&str; 4] = [
    "classification",
    "model_configuration",
    "statistics",
    "model_repository",
];

/// Platform string of candle-run models in metadata and config.
const PLATFORM: &str = "candle";

/// The gRPC service over the model registry.
pub struct InferenceService {
    lifecycle: Arc<Lifecycle>,
    registry: Arc<Registry>,
    max_batch_size: usize,
    /// `--instances`, which a version's own `instance_group` overrides.
    instances: usize,
}

impl InferenceService {
    /// A service answering for every model in `registry`.
    pub fn new(lifecycle: Arc<Lifecycle>, max_batch_size: usize, instances: usize) -> Self {
        Self {
            registry: lifecycle.registry().clone(),
            lifecycle,
            max_batch_size,
            instances,
        }
    }
}

fn tensor_meta(name: &str, datatype: &str, shape: Vec<i64>) -> TensorMetadata {
    TensorMetadata {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape,
    }
}

fn data_type(datatype: &str) -> DataType {
    match datatype {
        "UINT8" => DataType::TypeUint8,
        "INT32" => DataType::TypeInt32,
        _ => DataType::TypeFp32,
    }
}

fn model_input(input: &codec::InputSpec) -> ModelInput {
    let format = if input.shape.last() == Some(&3) {
        model_input::Format::Nhwc
    } else {
        model_input::Format::Nchw
    };
    ModelInput {
        name: input.name.to_owned(),
        data_type: data_type(input.datatype) as i32,
        format: format as i32,
        // ModelConfig leaves the batch dimension out when max_batch_size > 0.
        dims: input.shape[1..].to_vec(),
        ..Default::default()
    }
}

fn model_output(output: Output, classes: usize) -> ModelOutput {
    // The outputs whose values index the labels.
    let labelled = matches!(
        output,
        Output::Logits | Output::Probabilities | Output::DetectionClasses
    );
    ModelOutput {
        name: output.name().to_owned(),
        data_type: data_type(output.datatype()) as i32,
        dims: output.shape(classes)[1..].to_vec(),
        label_filename: if labelled {
            "labels.txt".to_owned()
        } else {
            String::new()
        },
        ..Default::default()
    }
}

/// Triton's ModelConfig of a loaded version. Its `parameters` carry what a client needs beyond the tensors: the
/// `labels`, one per line in class order (a detector's `detection_classes` index them), and the `preprocessing`
/// recipe as JSON.
fn model_config(
    name: &str,
    kind: Kind,
    c: &VersionConfig,
    labels: &[String],
    max_batch_size: usize,
    instances: usize,
) -> ModelConfig {
    let parameter = |value: String| ModelParameter {
        string_value: value,
    };
    ModelConfig {
        name: name.to_owned(),
        platform: PLATFORM.to_owned(),
        backend: PLATFORM.to_owned(),
        max_batch_size: i32::try_from(max_batch_size).unwrap_or(i32::MAX),
        input: vec![model_input(&codec::input_of(kind, c))],
        output: Output::of(kind)
            .iter()
            .map(|&o| model_output(o, c.num_classes))
            .collect(),
        instance_group: vec![ModelInstanceGroup {
            name: format!("{name}_cpu"),
            count: i32::try_from(c.instances(instances)).unwrap_or(i32::MAX),
            kind: model_instance_group::Kind::Cpu as i32,
            ..Default::default()
        }],
        dynamic_batching: Some(ModelDynamicBatching {
            max_queue_delay_microseconds: 0,
            ..Default::default()
        }),
        parameters: [
            ("labels".to_owned(), parameter(labels.join("\n"))),
            (
                "preprocessing".to_owned(),
                parameter(c.preprocessing.to_string()),
            ),
        ]
        .into(),
        ..Default::default()
    }
}

impl InferenceService {
    /// ServerMetadata: the name, version and extensions.
    pub fn server_metadata(&self) -> ServerMetadataResponse {
        ServerMetadataResponse {
            name: SERVER_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.map(String::from).to_vec(),
        }
    }

    /// Whether every model has a version that serves.
    pub fn server_ready(&self) -> bool {
        self.registry.all_ready()
    }

    /// Whether the version (the newest serving one when `version` is empty) serves.
    pub fn model_ready(&self, name: &str, version: &str) -> Result<bool, InferError> {
        let slot = self.registry.resolve(name, version)?;
        Ok(slot.ready().is_ok())
    }

    /// ModelMetadata of a serving version.
    pub fn model_metadata(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelMetadataResponse, InferError> {
        let slot = self.registry.resolve(name, version)?;
        let loaded = slot.ready()?;
        let c = &loaded.config;
        let input = codec::input_of(loaded.kind, c);
        // The versions that serve now: a client pins one of them, so its input size and labels never mix.
        let versions = self
            .registry
            .serving_versions(name)
            .iter()
            .map(u64::to_string)
            .collect();
        Ok(ModelMetadataResponse {
            name: slot.model.clone(),
            versions,
            platform: PLATFORM.to_owned(),
            inputs: vec![tensor_meta(input.name, input.datatype, input.shape)],
            outputs: Output::of(loaded.kind)
                .iter()
                .map(|o| tensor_meta(o.name(), o.datatype(), o.shape(c.num_classes)))
                .collect(),
        })
    }

    /// ModelConfig of a serving version.
    pub fn model_config(&self, name: &str, version: &str) -> Result<ModelConfig, InferError> {
        let slot = self.registry.resolve(name, version)?;
        let loaded = slot.ready()?;
        Ok(model_config(
            &slot.model,
            loaded.kind,
            &loaded.config,
            &loaded.labels,
            self.max_batch_size,
            self.instances,
        ))
    }

    /// ModelStatistics of every model (empty `name`), every version of one (empty `version`), or one version.
    pub fn model_statistics(
        &self,
        name: &str,
        version: &str,
    ) -> Result<ModelStatisticsResponse, InferError> {
        let slots = if name.is_empty() {
            self.registry.slots()
        } else if version.is_empty() {
            self.registry.versions(name)?
        } else {
            vec![self.registry.resolve(name, version)?]
        };
        // A version that does not serve has served nothing since it was (re)loaded.
        let model_stats = slots
            .iter()
            .map(|s| match s.serving() {
                Some(l) => l.stats().to_proto(&s.model, s.version),
                None => Stats::default().to_proto(&s.model, s.version),
            })
            .collect();
        Ok(ModelStatisticsResponse { model_stats })
    }

    /// ModelInfer, for both transports: checks the request, queues it for the batcher and encodes the answer.
    /// Its work is recorded under `span`, which the transport made and linked to the caller's trace.
    pub async fn infer(
        &self,
        mut r: ModelInferRequest,
        span: tracing::Span,
    ) -> Result<ModelInferResponse, InferError> {
        span.record("model", r.model_name.as_str());
        span.record("version", r.model_version.as_str());
        span.record("request_id", r.id.as_str());
        let entered = span.enter();
        let slot = self.registry.resolve(&r.model_name, &r.model_version)?;
        let loaded = slot.ready()?;
        let raw = std::mem::take(&mut r.raw_input_contents);
        let parsed = codec::parse(
            &mut r.inputs,
            raw,
            &r.outputs,
            &r.parameters,
            loaded.kind,
            &loaded.config,
            self.max_batch_size,
        )
        .inspect_err(|_| loaded.stats().record_refused(Failure::InvalidArgument))?;
        drop(entered);
        let (batch, k) = (
            parsed.request.batch,
            parsed.request.selection.max_detections,
        );
        let result =
            tracing::Instrument::instrument(loaded.batcher.infer(parsed.request), span.clone())
                .await;
        let out = result
            .inspect_err(|e| tracing::debug!(parent: &span, error = %e, "inference failed"))?;
        let (outputs, raw_output_contents) =
            codec::encode(&parsed.outputs, batch, &out, &loaded.labels, k)?;
        Ok(ModelInferResponse {
            model_name: slot.model.clone(),
            model_version: slot.version.to_string(),
            id: r.id,
            parameters: Default::default(),
            outputs,
            raw_output_contents,
        })
    }
}

/// The span of one inference request; the transport fills in its parent.
pub fn infer_span() -> tracing::Span {
    tracing::info_span!(
        "model_infer",
        model = tracing::field::Empty,
        version = tracing::field::Empty,
        request_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    )
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: InferenceService::server_ready(self),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = InferenceService::model_ready(self, &r.name, &r.version)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(InferenceService::server_metadata(self)))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(InferenceService::model_metadata(
            self, &r.name, &r.version,
        )?))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let span = infer_span();
        // The caller's trace (W3C `traceparent` in the metadata) becomes this span's parent.
        observability::set_parent_from_grpc(&span, req.metadata());
        let response = self.infer(req.into_inner(), span).await?;
        Ok(Response::new(response))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let config = InferenceService::model_config(self, &r.name, &r.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(InferenceService::model_statistics(
            self, &r.name, &r.version,
        )?))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let models = repository_index(&self.lifecycle, req.into_inner().ready);
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let r = req.into_inner();
        let config = load_parameters(&r.parameters)?;
        let span = tracing::info_span!("repository_model_load", model = %r.model_name);
        tracing::Instrument::instrument(self.lifecycle.load_model(&r.model_name, config), span)
            .await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let r = req.into_inner();
        check_unload_parameters(r.parameters.keys().map(String::as_str))?;
        let span = tracing::info_span!("repository_model_unload", model = %r.model_name);
        tracing::Instrument::instrument(self.lifecycle.unload_model(&r.model_name), span).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// The RepositoryIndex lines, only the `READY` ones when `ready_only`; the HTTP path answers the same.
pub fn repository_index(lifecycle: &Lifecycle, ready_only: bool) -> Vec<ModelIndex> {
    lifecycle
        .index()
        .into_iter()
        .filter(|e| !ready_only || e.phase == crate::registry::Phase::Ready)
        .map(index_entry)
        .collect()
}

/// One RepositoryIndex line.
fn index_entry(e: IndexEntry) -> ModelIndex {
    ModelIndex {
        name: e.model,
        version: e.version.map(|v| v.to_string()).unwrap_or_default(),
        state: e.phase.as_str().to_owned(),
        reason: e.reason,
    }
}

/// The `config` parameter of a load call, the only one this server takes (Triton's `file:` parameters, which
/// upload model files through the control call, are refused: models come from the repository).
pub fn load_parameters(
    params: &std::collections::HashMap<String, oip_proto::inference::ModelRepositoryParameter>,
) -> Result<Option<ConfigOverride>, InferError> {
    let mut config = None;
    for (name, value) in params {
        if name != "config" {
            return Err(invalid(format!(
                "load parameter `{name}` is not supported; the only one is `config`, a JSON override of the \
                 model's config.json"
            )));
        }
        let text = match &value.parameter_choice {
            Some(ParameterChoice::StringParam(s)) => s.clone(),
            Some(ParameterChoice::BytesParam(b)) => String::from_utf8(b.clone())
                .map_err(|_| invalid("the `config` parameter must be UTF-8 JSON text"))?,
            _ => return Err(invalid("the `config` parameter must be a string of JSON")),
        };
        config = Some(ConfigOverride::parse(&text).map_err(InferError::InvalidArgument)?);
    }
    Ok(config)
}

/// Unload takes Triton's `unload_dependents` (there are no ensembles here, so it changes nothing) and nothing
/// else.
pub fn check_unload_parameters<'a>(
    mut names: impl Iterator<Item = &'a str>,
) -> Result<(), InferError> {
    match names.find(|n| *n != "unload_dependents") {
        Some(name) => Err(invalid(format!(
            "unload parameter `{name}` is not supported; the only one is `unload_dependents`"
        ))),
        None => Ok(()),
    }
}
