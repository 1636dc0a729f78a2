//! The model tier over gRPC (Open Inference Protocol), using the classification extension for labels.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use oip_proto::GrpcInferenceServiceClient;
use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{Classification, ClassifyRequest, ModelClient, ModelError, ModelSpec, Prediction};

/// Room for a large top-k answer; the default of 4 MiB is plenty for one image but not for everything.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// [`ModelClient`] over one tonic channel.
#[derive(Clone)]
pub struct GrpcModelClient {
    client: GrpcInferenceServiceClient<Channel>,
    timeout: Duration,
}

impl GrpcModelClient {
    /// A client for `address` that connects on first use, so the gateway starts before the model tier.
    pub fn connect_lazy(address: &str, timeout: Duration) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(address.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(GrpcModelClient { client, timeout })
    }

    fn request<T>(&self, message: T, request_id: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        // Tells the server our deadline so it can drop work nobody waits for.
        request.set_timeout(self.timeout);
        if let Some(id) = request_id.and_then(|id| id.parse().ok()) {
            request.metadata_mut().insert("x-request-id", id);
        }
        request
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, ModelError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(from_status(&status)),
            Err(_) => Err(ModelError::DeadlineExceeded(format!(
                "the model server did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

#[async_trait]
impl ModelClient for GrpcModelClient {
    async fn metadata(&self, model: &str, version: &str) -> Result<ModelSpec, ModelError> {
        let request = self.request(
            ModelMetadataRequest {
                name: model.into(),
                version: version.into(),
            },
            None,
        );
        let mut client = self.client.clone();
        let metadata = self.call(client.model_metadata(request)).await?;
        spec_from_metadata(model, version, &metadata)
    }

    async fn ready(&self, model: &str, version: &str) -> Result<bool, ModelError> {
        let request = self.request(
            ModelReadyRequest {
                name: model.into(),
                version: version.into(),
            },
            None,
        );
        let mut client = self.client.clone();
        Ok(self.call(client.model_ready(request)).await?.ready)
    }

    async fn classify(&self, request: ClassifyRequest) -> Result<Classification, ModelError> {
        let spec = request.spec.clone();
        let id = request.request_id.clone();
        let message = infer_request(request);
        let message = self.request(message, Some(&id));
        let mut client = self.client.clone();
        let response = self.call(client.model_infer(message)).await?;
        classification_from_response(&spec, &response)
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

/// Picks the UINT8 `[-1, H, W, 3]` input and the classification output out of the metadata.
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
        input: input.name.clone(),
        height: u32::try_from(input.shape[1]).unwrap_or(0),
        width: u32::try_from(input.shape[2]).unwrap_or(0),
        output: output.name.clone(),
        classes,
    })
}

/// One image as raw UINT8 NHWC, asking for the top-k classes of the classification output.
pub fn infer_request(request: ClassifyRequest) -> ModelInferRequest {
    let spec = &request.spec;
    let classification = InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(i64::from(request.top_k))),
    };
    ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: spec.version.clone(),
        id: request.request_id,
        parameters: HashMap::new(),
        inputs: vec![InferInputTensor {
            name: spec.input.clone(),
            datatype: "UINT8".into(),
            shape: vec![1, i64::from(spec.height), i64::from(spec.width), 3],
            parameters: HashMap::new(),
            contents: None,
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: spec.output.clone(),
            parameters: HashMap::from([("classification".to_owned(), classification)]),
        }],
        raw_input_contents: vec![request.pixels],
    }
}

/// Reads the classification output (`"<probability>:<index>:<label>"` BYTES elements, raw or typed).
pub fn classification_from_response(
    spec: &ModelSpec,
    response: &ModelInferResponse,
) -> Result<Classification, ModelError> {
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
    let mut predictions = elements
        .iter()
        .map(|e| {
            parse_class(e)
                .ok_or_else(|| bad(format!("malformed class `{}`", String::from_utf8_lossy(e))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    predictions.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    Ok(Classification {
        model: if response.model_name.is_empty() {
            spec.name.clone()
        } else {
            response.model_name.clone()
        },
        version: if response.model_version.is_empty() {
            spec.version.clone()
        } else {
            response.model_version.clone()
        },
        predictions,
    })
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
            input: "pixels".into(),
            height: 224,
            width: 224,
            output: "probabilities".into(),
            classes: Some(1000),
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
            pixels: vec![7; 224 * 224 * 3],
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
        let classification = classification_from_response(&spec(), &answer).unwrap();
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
        let classification = classification_from_response(&spec(), &answer).unwrap();
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
            assert!(classification_from_response(&spec(), &answer).is_err());
        }
        let mut float = bytes_output(None);
        float.datatype = "FP32".into();
        assert!(classification_from_response(&spec(), &response(float, vec![vec![0; 8]])).is_err());
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
