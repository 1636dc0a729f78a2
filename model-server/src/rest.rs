//! The KServe v2 REST inference API as JSON: requests with JSON tensors, or binary tensors after the JSON header
//! (Triton's binary-data extension), turned into the ModelInfer messages the gRPC path takes, and its answers
//! turned back. Validation stays in the codec; this module only changes the wire form.

use std::collections::HashMap;

use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::{
    InferParameter, InferStatistics, InferTensorContents, ModelConfig, ModelInferRequest,
    ModelInferResponse, ModelMetadataResponse, ModelStatistics, ServerMetadataResponse,
    StatisticDuration,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{InferError, invalid};

/// Header giving the length of the JSON part of a body that carries binary tensors after it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Input parameter: the tensor is this many bytes of the binary part, in the order of the inputs.
const BINARY_DATA_SIZE: &str = "binary_data_size";
/// Output parameter: return this output as binary data.
const BINARY_DATA: &str = "binary_data";
/// Request parameter: return every output as binary data.
const BINARY_DATA_OUTPUT: &str = "binary_data_output";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<Input>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A parsed REST request: the ModelInfer message, and which outputs go back as binary data.
pub struct Request {
    pub message: ModelInferRequest,
    pub binary_outputs: BinaryOutputs,
}

/// Which outputs the client wants as binary data.
pub enum BinaryOutputs {
    All,
    Named(Vec<String>),
}

/// Reads an inference request body: JSON alone, or `header_length` bytes of JSON followed by the binary tensors.
pub fn parse_request(
    body: &[u8],
    header_length: Option<usize>,
    model: &str,
    version: &str,
) -> Result<Request, InferError> {
    let (header, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(invalid(format!(
                "{HEADER_LENGTH} is {n} but the body is only {} bytes",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let request: InferRequest = serde_json::from_slice(header)
        .map_err(|e| invalid(format!("the inference request is not valid JSON: {e}")))?;
    let mut raw = Vec::new();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for mut input in request.inputs {
        let size = input.parameters.remove(BINARY_DATA_SIZE);
        let contents = match (size, input.data.take()) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "input `{}` has both `data` and `{BINARY_DATA_SIZE}`; send it in one of them",
                    input.name
                )));
            }
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "`{BINARY_DATA_SIZE}` of input `{}` must be a byte count",
                            input.name
                        ))
                    })?;
                if size > binary.len() {
                    return Err(invalid(format!(
                        "input `{}` has {BINARY_DATA_SIZE} {size} but only {} bytes of binary data are left",
                        input.name,
                        binary.len()
                    )));
                }
                let (tensor, rest) = binary.split_at(size);
                raw.push(tensor.to_vec());
                binary = rest;
                None
            }
            (None, Some(data)) => Some(typed_contents(&input.name, &input.datatype, data)?),
            (None, None) => {
                return Err(invalid(format!(
                    "input `{}` has neither `data` nor `{BINARY_DATA_SIZE}`",
                    input.name
                )));
            }
        };
        inputs.push(InferInputTensor {
            parameters: parameters(input.parameters)?,
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            contents,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data follow the JSON but no input claims them with `{BINARY_DATA_SIZE}`",
            binary.len()
        )));
    }
    // The protocol message holds raw contents for every input or for none.
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(invalid(
            "send every input as binary data or every input as JSON `data`, not a mix",
        ));
    }
    let mut request_parameters = request.parameters;
    let all_binary = match request_parameters.remove(BINARY_DATA_OUTPUT) {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(invalid(format!(
                "parameter `{BINARY_DATA_OUTPUT}` must be true or false"
            )));
        }
    };
    let mut binary_named = Vec::new();
    let mut outputs = Vec::with_capacity(request.outputs.len());
    for mut output in request.outputs {
        match output.parameters.remove(BINARY_DATA) {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => binary_named.push(output.name.clone()),
            Some(_) => {
                return Err(invalid(format!(
                    "parameter `{BINARY_DATA}` of output `{}` must be true or false",
                    output.name
                )));
            }
        }
        outputs.push(InferRequestedOutputTensor {
            parameters: parameters(output.parameters)?,
            name: output.name,
        });
    }
    Ok(Request {
        message: ModelInferRequest {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            id: request.id,
            parameters: parameters(request_parameters)?,
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        binary_outputs: if all_binary {
            BinaryOutputs::All
        } else {
            BinaryOutputs::Named(binary_named)
        },
    })
}

/// JSON parameters as the protocol's typed ones.
fn parameters(map: Map<String, Value>) -> Result<HashMap<String, InferParameter>, InferError> {
    map.into_iter()
        .map(|(name, value)| {
            let choice = match value {
                Value::Bool(b) => ParameterChoice::BoolParam(b),
                Value::String(s) => ParameterChoice::StringParam(s),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
                    _ => return Err(invalid(format!("parameter `{name}` is not a number"))),
                },
                other => {
                    return Err(invalid(format!(
                        "parameter `{name}` must be a boolean, number or string, not {other}"
                    )));
                }
            };
            Ok((
                name,
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// JSON `data`, flat or nested row-major as the REST API allows, as the typed contents of its datatype.
fn typed_contents(
    name: &str,
    datatype: &str,
    data: Value,
) -> Result<InferTensorContents, InferError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    // Every element must convert, or the message names what the datatype needs.
    fn all<T>(
        flat: &[Value],
        convert: impl Fn(&Value) -> Option<T>,
        error: impl Fn() -> InferError,
    ) -> Result<Vec<T>, InferError> {
        flat.iter()
            .map(convert)
            .collect::<Option<_>>()
            .ok_or_else(error)
    }
    let wrong = |what: &'static str| {
        move || {
            invalid(format!(
                "input `{name}` ({datatype}) has `data` that is not all {what}"
            ))
        }
    };
    let mut contents = InferTensorContents::default();
    match datatype {
        "UINT8" | "UINT16" | "UINT32" => {
            let to_u32 = |v: &Value| v.as_u64().and_then(|v| u32::try_from(v).ok());
            contents.uint_contents = all(&flat, to_u32, wrong("unsigned integers"))?;
        }
        "INT8" | "INT16" | "INT32" => {
            let to_i32 = |v: &Value| v.as_i64().and_then(|v| i32::try_from(v).ok());
            contents.int_contents = all(&flat, to_i32, wrong("integers"))?;
        }
        "INT64" => contents.int64_contents = all(&flat, Value::as_i64, wrong("integers"))?,
        "UINT64" => {
            contents.uint64_contents = all(&flat, Value::as_u64, wrong("unsigned integers"))?;
        }
        "FP32" => {
            let to_f32 = |v: &Value| v.as_f64().map(|v| v as f32);
            contents.fp32_contents = all(&flat, to_f32, wrong("numbers"))?;
        }
        "FP64" => contents.fp64_contents = all(&flat, Value::as_f64, wrong("numbers"))?,
        "BOOL" => contents.bool_contents = all(&flat, Value::as_bool, wrong("booleans"))?,
        "BYTES" => {
            let to_bytes = |v: &Value| v.as_str().map(|s| s.as_bytes().to_vec());
            contents.bytes_contents = all(&flat, to_bytes, wrong("strings"))?;
        }
        other => {
            return Err(invalid(format!(
                "input `{name}` has unknown datatype `{other}`"
            )));
        }
    }
    Ok(contents)
}

fn flatten(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.into_iter().for_each(|v| flatten(v, out)),
        scalar => out.push(scalar),
    }
}

/// A REST answer: the JSON, and the binary outputs to append after it when there are any.
pub struct Body {
    pub json: Vec<u8>,
    pub binary: Vec<u8>,
}

/// The ModelInfer answer as the REST API gives it, each output as JSON `data` or as binary data after the JSON.
pub fn encode_response(
    response: ModelInferResponse,
    binary_outputs: &BinaryOutputs,
) -> Result<Body, InferError> {
    let mut binary = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .zip(response.raw_output_contents)
        .map(|(tensor, raw)| {
            let as_binary = match binary_outputs {
                BinaryOutputs::All => true,
                BinaryOutputs::Named(names) => names.contains(&tensor.name),
            };
            let mut out = json!({
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": tensor.shape,
            });
            if as_binary {
                out["parameters"] = json!({ BINARY_DATA_SIZE: raw.len() });
                binary.extend_from_slice(&raw);
            } else {
                out["data"] = json_data(&tensor.datatype, &raw)?;
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, InferError>>()?;
    let mut answer = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    });
    if !response.id.is_empty() {
        answer["id"] = Value::String(response.id);
    }
    Ok(Body {
        json: answer.to_string().into_bytes(),
        binary,
    })
}

/// Raw little-endian output contents as a flat JSON array.
fn json_data(datatype: &str, raw: &[u8]) -> Result<Value, InferError> {
    let values: Vec<Value> = match datatype {
        "FP32" => raw
            .chunks_exact(4)
            .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        "INT32" => raw
            .chunks_exact(4)
            .map(|c| json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        "BYTES" => {
            let mut strings = Vec::new();
            let mut rest = raw;
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let len = u32::from_le_bytes(*len) as usize;
                let Some((s, tail)) = (len <= tail.len()).then(|| tail.split_at(len)) else {
                    break;
                };
                strings.push(json!(String::from_utf8_lossy(s)));
                rest = tail;
            }
            strings
        }
        other => {
            return Err(InferError::InvalidArgument(format!(
                "output datatype `{other}` has no JSON form here"
            )));
        }
    };
    Ok(Value::Array(values))
}

/// `GET /v2`.
pub fn server_metadata(m: ServerMetadataResponse) -> Value {
    json!({ "name": m.name, "version": m.version, "extensions": m.extensions })
}

/// `GET /v2/models/{m}[/versions/{v}]`.
pub fn model_metadata(m: ModelMetadataResponse) -> Value {
    let tensors = |ts: Vec<oip_proto::inference::model_metadata_response::TensorMetadata>| {
        ts.into_iter()
            .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
            .collect::<Vec<_>>()
    };
    json!({
        "name": m.name,
        "versions": m.versions,
        "platform": m.platform,
        "inputs": tensors(m.inputs),
        "outputs": tensors(m.outputs),
    })
}

/// `GET .../config`: Triton's ModelConfig JSON, enum values by name and numbers as numbers.
pub fn model_config(c: ModelConfig) -> Value {
    use oip_proto::inference::{DataType, model_input, model_instance_group};
    let data_type = |t: i32| DataType::try_from(t).map_or("TYPE_INVALID", |t| t.as_str_name());
    let inputs: Vec<Value> = c
        .input
        .iter()
        .map(|i| {
            json!({
                "name": i.name,
                "data_type": data_type(i.data_type),
                "format": model_input::Format::try_from(i.format).map_or("FORMAT_NONE", |f| f.as_str_name()),
                "dims": i.dims,
                "optional": i.optional,
            })
        })
        .collect();
    let outputs: Vec<Value> = c
        .output
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "data_type": data_type(o.data_type),
                "dims": o.dims,
                "label_filename": o.label_filename,
            })
        })
        .collect();
    let groups: Vec<Value> = c
        .instance_group
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "kind": model_instance_group::Kind::try_from(g.kind).map_or("KIND_AUTO", |k| k.as_str_name()),
                "count": g.count,
            })
        })
        .collect();
    let parameters: Map<String, Value> = c
        .parameters
        .into_iter()
        .map(|(k, v)| (k, json!({ "string_value": v.string_value })))
        .collect();
    let mut config = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": groups,
        "parameters": parameters,
    });
    if let Some(d) = c.dynamic_batching {
        config["dynamic_batching"] =
            json!({ "max_queue_delay_microseconds": d.max_queue_delay_microseconds });
    }
    config
}

/// `GET .../stats`: the ModelStatistics answer as Triton's REST API gives it.
pub fn model_statistics(stats: Vec<ModelStatistics>) -> Value {
    let duration = |d: Option<StatisticDuration>| {
        let d = d.unwrap_or_default();
        json!({ "count": d.count, "ns": d.ns })
    };
    let infer = |s: Option<InferStatistics>| {
        let s = s.unwrap_or_default();
        json!({
            "success": duration(s.success),
            "fail": duration(s.fail),
            "queue": duration(s.queue),
            "compute_input": duration(s.compute_input),
            "compute_infer": duration(s.compute_infer),
            "compute_output": duration(s.compute_output),
            "cache_hit": duration(s.cache_hit),
            "cache_miss": duration(s.cache_miss),
        })
    };
    let models: Vec<Value> = stats
        .into_iter()
        .map(|m| {
            let batches: Vec<Value> = m
                .batch_stats
                .into_iter()
                .map(|b| {
                    json!({
                        "batch_size": b.batch_size,
                        "compute_input": duration(b.compute_input),
                        "compute_infer": duration(b.compute_infer),
                        "compute_output": duration(b.compute_output),
                    })
                })
                .collect();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": infer(m.inference_stats),
                "batch_stats": batches,
            })
        })
        .collect();
    json!({ "model_stats": models })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &[u8], header: Option<usize>) -> Result<Request, InferError> {
        parse_request(body, header, "m", "")
    }

    #[test]
    fn json_data_may_be_nested_and_becomes_typed_contents() {
        let body = br#"{"inputs":[{"name":"pixels","shape":[1,2,2],"datatype":"UINT8","data":[[1,2],[3,255]]}],
            "outputs":[{"name":"probabilities","parameters":{"classification":3}}]}"#;
        let r = parse(body, None).unwrap();
        let input = &r.message.inputs[0];
        assert_eq!(
            input.contents.as_ref().unwrap().uint_contents,
            [1, 2, 3, 255]
        );
        assert!(r.message.raw_input_contents.is_empty());
        let k = &r.message.outputs[0].parameters["classification"];
        assert_eq!(k.parameter_choice, Some(ParameterChoice::Int64Param(3)));
    }

    #[test]
    fn binary_inputs_are_cut_from_after_the_header_in_order() {
        let header = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}},
            {"name":"b","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":1}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[7, 8, 9]);
        let r = parse(&body, Some(header.len())).unwrap();
        assert_eq!(r.message.raw_input_contents, [vec![7, 8], vec![9]]);
        assert!(
            r.message.inputs[0].parameters.is_empty(),
            "binary_data_size is the transport's"
        );
        assert!(matches!(r.binary_outputs, BinaryOutputs::All));
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let cases: [(&[u8], Option<usize>, &str); 7] = [
            (b"{", None, "not valid JSON"),
            (b"{}", Some(10), "body is only 2 bytes"),
            (br#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8"}]}"#, None, "neither `data` nor"),
            (br#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","data":[-1]}]}"#, None, "not all unsigned integers"),
            (br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":["x"]}]}"#, None, "not all numbers"),
            (br#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":4}}]}"#, None, "only 0 bytes"),
            (br#"{"inputs":[],"outputs":[{"name":"o","parameters":{"binary_data":1}}]}"#, None, "must be true or false"),
        ];
        for (body, header, phrase) in cases {
            match parse(body, header) {
                Err(InferError::InvalidArgument(m)) => {
                    assert!(m.contains(phrase), "`{m}` lacks `{phrase}`")
                }
                Err(e) => panic!("{phrase}: wrong error {e:?}"),
                Ok(_) => panic!("{phrase}: accepted"),
            }
        }
        let mut extra = br#"{"inputs":[]}"#.to_vec();
        let n = extra.len();
        extra.push(0);
        assert!(
            parse(&extra, Some(n)).is_err(),
            "unclaimed binary data is refused"
        );
    }

    #[test]
    fn outputs_go_back_as_json_or_binary_as_asked() {
        let body = br#"{"id":"7","inputs":[],"outputs":[{"name":"logits"},{"name":"classes","parameters":{"binary_data":true}}]}"#;
        let request = parse(body, None).unwrap();
        let classes = [&3u32.to_le_bytes()[..], b"a:b", &1u32.to_le_bytes(), b"c"].concat();
        let response = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "7".into(),
            outputs: vec![
                oip_proto::inference::model_infer_response::InferOutputTensor {
                    name: "logits".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
                oip_proto::inference::model_infer_response::InferOutputTensor {
                    name: "classes".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1, 2],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![
                [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat(),
                classes.clone(),
            ],
            ..Default::default()
        };
        let body = encode_response(response, &request.binary_outputs).unwrap();
        let json: Value = serde_json::from_slice(&body.json).unwrap();
        assert_eq!(json["id"], "7");
        assert_eq!(json["outputs"][0]["data"], json!([1.5, -2.0]));
        assert_eq!(
            json["outputs"][1]["parameters"]["binary_data_size"],
            classes.len()
        );
        assert_eq!(body.binary, classes);
        assert_eq!(json_data("BYTES", &classes).unwrap(), json!(["a:b", "c"]));
    }
}
