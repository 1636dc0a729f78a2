//! Building a real ModelInfer request: the model's own metadata says the input's name and size, and the image is
//! resized to it and sent as raw UINT8 pixels, as the gateway sends them.

use std::collections::HashMap;
use std::path::Path;

use oip_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::{InferParameter, ModelInferRequest, ModelMetadataRequest};
use tonic::transport::Channel;

use crate::error::LoadError;

/// The request and how many output elements a correct answer has.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub request: ModelInferRequest,
    pub expected_output_elements: u64,
}

/// Classes asked for per image, as the gateway asks for its default top-5.
const TOP_K: i64 = 5;

/// Asks the server for the model's metadata and builds one request of `batch` copies of `image`.
pub async fn prepare(
    client: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    version: &str,
    image: &Path,
    batch: usize,
) -> Result<Prepared, LoadError> {
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: model.to_owned(),
            version: version.to_owned(),
        })
        .await
        .map_err(|s| {
            LoadError::Target(format!(
                "model metadata of {model}: {}: {}",
                s.code(),
                s.message()
            ))
        })?
        .into_inner();
    let input = metadata
        .inputs
        .iter()
        .find(|t| {
            t.datatype == "UINT8"
                && t.shape.len() == 4
                && t.shape[3] == 3
                && t.shape[1] > 0
                && t.shape[2] > 0
        })
        .ok_or_else(|| {
            LoadError::Target(format!(
                "model {model} has no UINT8 input of shape [-1, height, width, 3]"
            ))
        })?;
    let output = metadata
        .outputs
        .first()
        .ok_or_else(|| LoadError::Target(format!("model {model} declares no output")))?;
    let (height, width) = (
        u32::try_from(input.shape[1])
            .map_err(|_| LoadError::Target("input height out of range".into()))?,
        u32::try_from(input.shape[2])
            .map_err(|_| LoadError::Target("input width out of range".into()))?,
    );
    let pixels = image::open(image)
        .map_err(|e| LoadError::Input(format!("cannot read image {}: {e}", image.display())))?
        .resize_exact(width, height, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .into_raw();
    let batch_len = i64::try_from(batch).map_err(|_| LoadError::Input("batch too large".into()))?;
    let request = ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: String::new(),
        parameters: HashMap::new(),
        inputs: vec![InferInputTensor {
            name: input.name.clone(),
            datatype: "UINT8".into(),
            shape: vec![batch_len, i64::from(height), i64::from(width), 3],
            parameters: HashMap::new(),
            contents: None,
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: output.name.clone(),
            parameters: HashMap::from([(
                "classification".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(TOP_K)),
                },
            )]),
        }],
        raw_input_contents: vec![pixels.repeat(batch)],
    };
    Ok(Prepared {
        request,
        expected_output_elements: u64::try_from(batch_len * TOP_K).unwrap_or(0),
    })
}
