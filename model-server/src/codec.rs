//! Open Inference Protocol tensors to and from batcher requests: input
//! validation with messages that say what was expected, raw and typed
//! contents, and the classification extension.

use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::model_infer_response::InferOutputTensor;
use oip_proto::inference::{InferParameter, infer_parameter::ParameterChoice};

use crate::batcher::{Images, Request, Response};
use crate::error::{InferError, invalid};
use crate::repository::VersionConfig;

/// Input carrying raw RGB pixels, UINT8 `[N, H, W, 3]`.
pub const PIXELS: &str = "pixels";
/// Input carrying normalised FP32 `[N, 3, H, W]`.
pub const INPUT: &str = "input";
/// Output with the raw class scores, FP32 `[N, classes]`.
pub const LOGITS: &str = "logits";
/// Output with softmax probabilities, FP32 `[N, classes]`.
pub const PROBABILITIES: &str = "probabilities";
/// Requested-output parameter of the classification extension.
pub const CLASSIFICATION: &str = "classification";

/// Which of the model's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Logits,
    Probabilities,
}

impl Output {
    /// Protocol name of the output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Logits => LOGITS,
            Self::Probabilities => PROBABILITIES,
        }
    }
}

/// One output to return, optionally as top-k classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSpec {
    pub output: Output,
    pub classification: Option<usize>,
}

/// A checked inference request.
#[derive(Debug)]
pub struct Parsed {
    pub request: Request,
    pub outputs: Vec<OutputSpec>,
}

/// Checks the inputs and requested outputs of a ModelInfer request against
/// the model and turns them into a batcher request. Raw bytes and typed FP32
/// values are moved out of the request, not copied.
pub fn parse(
    inputs: &mut [InferInputTensor],
    raw: Vec<Vec<u8>>,
    outputs: &[InferRequestedOutputTensor],
    config: &VersionConfig,
    max_batch_size: usize,
) -> Result<Parsed, InferError> {
    let [input] = inputs else {
        return Err(invalid(format!(
            "expected exactly one input, `{PIXELS}` (UINT8 {}) or `{INPUT}` (FP32 {}); got {}",
            shape_text(&pixels_shape(config)),
            shape_text(&input_shape(config)),
            inputs.len()
        )));
    };
    let raw = if raw.is_empty() {
        None
    } else {
        if raw.len() != 1 {
            return Err(invalid(format!(
                "raw_input_contents has {} entries for 1 input; give one per input",
                raw.len()
            )));
        }
        if input.contents.is_some() {
            return Err(invalid(
                "input contents and raw_input_contents are mutually exclusive; send the tensor in one of them",
            ));
        }
        raw.into_iter().next()
    };
    let (expected_dtype, expected_shape) = match input.name.as_str() {
        PIXELS => ("UINT8", pixels_shape(config)),
        INPUT => ("FP32", input_shape(config)),
        other => {
            return Err(invalid(format!(
                "unknown input `{other}`; this model takes `{PIXELS}` or `{INPUT}`"
            )));
        }
    };
    if input.datatype != expected_dtype {
        return Err(invalid(format!(
            "input `{}` must be {expected_dtype}, got `{}`",
            input.name, input.datatype
        )));
    }
    let batch = check_shape(&input.name, &input.shape, &expected_shape, max_batch_size)?;
    let count = batch
        * expected_shape[1..]
            .iter()
            .map(|d| *d as usize)
            .product::<usize>();
    let images = match (input.name.as_str(), raw) {
        (PIXELS, Some(bytes)) => {
            check_len(&input.name, bytes.len(), count, 1)?;
            Images::Pixels(bytes)
        }
        (PIXELS, None) => {
            let values = input
                .contents
                .as_ref()
                .map(|c| c.uint_contents.as_slice())
                .unwrap_or_default();
            check_count(&input.name, "uint_contents", values.len(), count)?;
            let pixels = values
                .iter()
                .map(|v| u8::try_from(*v))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| {
                    invalid(format!(
                        "input `{PIXELS}` has a value above 255 in uint_contents"
                    ))
                })?;
            Images::Pixels(pixels)
        }
        (_, Some(bytes)) => {
            check_len(&input.name, bytes.len(), count, 4)?;
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Images::Normalised(check_finite(values)?)
        }
        (_, None) => {
            let values = input
                .contents
                .as_mut()
                .map(|c| std::mem::take(&mut c.fp32_contents))
                .unwrap_or_default();
            check_count(&input.name, "fp32_contents", values.len(), count)?;
            Images::Normalised(check_finite(values)?)
        }
    };
    let outputs = if outputs.is_empty() {
        vec![
            OutputSpec {
                output: Output::Logits,
                classification: None,
            },
            OutputSpec {
                output: Output::Probabilities,
                classification: None,
            },
        ]
    } else {
        outputs
            .iter()
            .map(|o| parse_output(o, config.num_classes))
            .collect::<Result<_, _>>()?
    };
    Ok(Parsed {
        request: Request { batch, images },
        outputs,
    })
}

/// `[-1, H, W, 3]`: the pixels input as ModelMetadata describes it.
pub fn pixels_shape(c: &VersionConfig) -> Vec<i64> {
    vec![
        -1,
        c.input.height as i64,
        c.input.width as i64,
        c.input.channels as i64,
    ]
}

/// `[-1, 3, H, W]`: the normalised input as ModelMetadata describes it.
pub fn input_shape(c: &VersionConfig) -> Vec<i64> {
    vec![
        -1,
        c.input.channels as i64,
        c.input.height as i64,
        c.input.width as i64,
    ]
}

fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| {
            if *d < 0 {
                "N".to_owned()
            } else {
                d.to_string()
            }
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Checks a shape against `[-1, ...]` and returns the batch size.
fn check_shape(
    name: &str,
    shape: &[i64],
    expected: &[i64],
    max_batch: usize,
) -> Result<usize, InferError> {
    let matches = shape.len() == expected.len() && shape[1..] == expected[1..];
    if !matches {
        return Err(invalid(format!(
            "input `{name}` has shape {shape:?}; expected {} with N images",
            shape_text(expected)
        )));
    }
    let batch = usize::try_from(shape[0]).unwrap_or(0);
    if batch == 0 {
        return Err(invalid(format!(
            "input `{name}` has batch size {}; it must be at least 1",
            shape[0]
        )));
    }
    if batch > max_batch {
        return Err(invalid(format!(
            "input `{name}` has batch size {batch}, above this model's max_batch_size {max_batch}; split the request"
        )));
    }
    Ok(batch)
}

fn check_len(name: &str, got: usize, count: usize, elem: usize) -> Result<(), InferError> {
    if got == count * elem {
        return Ok(());
    }
    Err(invalid(format!(
        "raw contents of input `{name}` are {got} bytes; the shape needs {count} elements of {elem} byte(s) = {} bytes",
        count * elem
    )))
}

fn check_count(name: &str, field: &str, got: usize, count: usize) -> Result<(), InferError> {
    if got == count {
        return Ok(());
    }
    Err(invalid(format!(
        "input `{name}` has {got} values in contents.{field}; the shape needs {count}"
    )))
}

fn check_finite(values: Vec<f32>) -> Result<Vec<f32>, InferError> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(values)
    } else {
        Err(invalid(format!(
            "input `{INPUT}` contains NaN or infinite values"
        )))
    }
}

fn parse_output(o: &InferRequestedOutputTensor, classes: usize) -> Result<OutputSpec, InferError> {
    let output = match o.name.as_str() {
        LOGITS => Output::Logits,
        PROBABILITIES => Output::Probabilities,
        other => {
            return Err(invalid(format!(
                "unknown output `{other}`; this model has `{LOGITS}` and `{PROBABILITIES}`"
            )));
        }
    };
    let classification = match o.parameters.get(CLASSIFICATION) {
        None => None,
        Some(p) => {
            let k = match p.parameter_choice {
                Some(ParameterChoice::Int64Param(k)) => usize::try_from(k).ok(),
                Some(ParameterChoice::Uint64Param(k)) => usize::try_from(k).ok(),
                _ => None,
            };
            match k {
                Some(k) if (1..=classes).contains(&k) => Some(k),
                _ => {
                    return Err(invalid(format!(
                        "parameter `{CLASSIFICATION}` of output `{}` must be an integer from 1 to {classes}",
                        o.name
                    )));
                }
            }
        }
    };
    Ok(OutputSpec {
        output,
        classification,
    })
}

/// Builds the output tensors and their raw contents, in the requested order.
pub fn encode(
    outputs: &[OutputSpec],
    batch: usize,
    response: &Response,
    labels: &[String],
) -> (Vec<InferOutputTensor>, Vec<Vec<u8>>) {
    let classes = labels.len();
    outputs
        .iter()
        .map(|spec| {
            let values = match spec.output {
                Output::Logits => &response.logits,
                Output::Probabilities => &response.probabilities,
            };
            match spec.classification {
                None => {
                    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (
                        tensor(
                            spec.output.name(),
                            "FP32",
                            vec![batch as i64, classes as i64],
                        ),
                        bytes,
                    )
                }
                Some(k) => {
                    let mut bytes = Vec::new();
                    for row in values.chunks(classes.max(1)) {
                        for (index, value) in top_k(row, k) {
                            let text = format!("{value:.6}:{index}:{}", labels[index]);
                            bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
                            bytes.extend_from_slice(text.as_bytes());
                        }
                    }
                    (
                        tensor(spec.output.name(), "BYTES", vec![batch as i64, k as i64]),
                        bytes,
                    )
                }
            }
        })
        .unzip()
}

fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> InferOutputTensor {
    InferOutputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape,
        ..Default::default()
    }
}

/// Indices and values of the `k` largest values, largest first; ties keep
/// the lower index first.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut indexed: Vec<(usize, f32)> = values.iter().copied().enumerate().collect();
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed.truncate(k);
    indexed
}

/// An `int64` request parameter, as clients build them.
pub fn int64_param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::{InputSize, Normalisation};
    use oip_proto::inference::InferTensorContents;

    fn config() -> VersionConfig {
        VersionConfig {
            architecture: "efficientnet-lite0".into(),
            weights: "w".into(),
            labels: "l".into(),
            num_classes: 4,
            input: InputSize {
                height: 2,
                width: 3,
                channels: 3,
            },
            normalisation: Normalisation {
                mean: 127.0,
                std: 128.0,
            },
            preprocessing: serde_json::Value::Null,
            instance_group: None,
        }
    }

    fn input(name: &str, dtype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: dtype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn err(r: Result<Parsed, InferError>) -> String {
        match r {
            Err(InferError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn raw_pixels_are_accepted_and_moved() {
        let p = parse(
            &mut [input(PIXELS, "UINT8", &[2, 2, 3, 3])],
            vec![vec![7; 36]],
            &[],
            &config(),
            4,
        )
        .unwrap();
        assert_eq!(p.request.batch, 2);
        assert!(matches!(p.request.images, Images::Pixels(ref v) if v.len() == 36));
        assert_eq!(p.outputs.len(), 2);
    }

    #[test]
    fn typed_fp32_is_accepted() {
        let mut t = input(INPUT, "FP32", &[1, 3, 2, 3]);
        t.contents = Some(InferTensorContents {
            fp32_contents: vec![0.5; 18],
            ..Default::default()
        });
        let p = parse(&mut [t], vec![], &[], &config(), 4).unwrap();
        assert!(matches!(p.request.images, Images::Normalised(ref v) if v.len() == 18));
    }

    #[test]
    fn wrong_inputs_say_what_was_expected() {
        // name, datatype, shape, raw byte count, phrases the message must contain
        type Case = (
            &'static str,
            &'static str,
            [i64; 4],
            usize,
            &'static [&'static str],
        );
        let cases: [Case; 6] = [
            (PIXELS, "FP32", [1, 2, 3, 3], 72, &["must be UINT8"]),
            (
                PIXELS,
                "UINT8",
                [1, 3, 2, 3],
                18,
                &["expected [N, 2, 3, 3]"],
            ),
            (PIXELS, "UINT8", [1, 2, 3, 3], 17, &["17 bytes", "18 bytes"]),
            (PIXELS, "UINT8", [5, 2, 3, 3], 90, &["max_batch_size 4"]),
            (PIXELS, "UINT8", [0, 2, 3, 3], 0, &["at least 1"]),
            ("x", "UINT8", [1, 2, 3, 3], 18, &["unknown input `x`"]),
        ];
        for (name, dtype, shape, bytes, expected) in cases {
            let m = err(parse(
                &mut [input(name, dtype, &shape)],
                vec![vec![0; bytes]],
                &[],
                &config(),
                4,
            ));
            for text in expected {
                assert!(
                    m.contains(text),
                    "{name} {dtype} {shape:?}: `{m}` lacks `{text}`"
                );
            }
        }
        let m = err(parse(&mut [], vec![], &[], &config(), 4));
        assert!(m.contains("exactly one input"), "{m}");
    }

    #[test]
    fn raw_and_typed_contents_are_exclusive() {
        let mut t = input(PIXELS, "UINT8", &[1, 2, 3, 3]);
        t.contents = Some(InferTensorContents {
            uint_contents: vec![0; 18],
            ..Default::default()
        });
        let m = err(parse(&mut [t], vec![vec![0; 18]], &[], &config(), 4));
        assert!(m.contains("mutually exclusive"), "{m}");
    }

    #[test]
    fn typed_pixels_above_255_are_refused() {
        let mut t = input(PIXELS, "UINT8", &[1, 2, 3, 3]);
        let mut values = vec![0; 18];
        values[3] = 256;
        t.contents = Some(InferTensorContents {
            uint_contents: values,
            ..Default::default()
        });
        assert!(err(parse(&mut [t], vec![], &[], &config(), 4)).contains("above 255"));
    }

    #[test]
    fn classification_parameter_is_checked() {
        let out = |k| InferRequestedOutputTensor {
            name: PROBABILITIES.into(),
            parameters: [(CLASSIFICATION.to_owned(), int64_param(k))].into(),
        };
        let t = || input(PIXELS, "UINT8", &[1, 2, 3, 3]);
        let p = parse(&mut [t()], vec![vec![0; 18]], &[out(2)], &config(), 4).unwrap();
        assert_eq!(
            p.outputs,
            [OutputSpec {
                output: Output::Probabilities,
                classification: Some(2)
            }]
        );
        for k in [0, 5, -1] {
            let m = err(parse(
                &mut [t()],
                vec![vec![0; 18]],
                &[out(k)],
                &config(),
                4,
            ));
            assert!(m.contains("from 1 to 4"), "{m}");
        }
    }

    #[test]
    fn classification_encodes_top_k_as_length_prefixed_strings() {
        let labels: Vec<String> = ["a", "b", "c", "d:e"].map(String::from).to_vec();
        let response = Response {
            logits: vec![0.0; 8],
            probabilities: vec![0.1, 0.2, 0.3, 0.4, 0.7, 0.1, 0.1, 0.1],
        };
        let spec = [OutputSpec {
            output: Output::Probabilities,
            classification: Some(2),
        }];
        let (tensors, raw) = encode(&spec, 2, &response, &labels);
        assert_eq!(
            (tensors[0].datatype.as_str(), tensors[0].shape.as_slice()),
            ("BYTES", &[2i64, 2][..])
        );
        let mut strings = Vec::new();
        let mut rest = raw[0].as_slice();
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            strings.push(String::from_utf8(rest[4..4 + len].to_vec()).unwrap());
            rest = &rest[4 + len..];
        }
        assert_eq!(
            strings,
            [
                "0.400000:3:d:e",
                "0.300000:2:c",
                "0.700000:0:a",
                "0.100000:1:b"
            ]
        );
    }
}
