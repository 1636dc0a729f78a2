//! Open Inference Protocol tensors to and from batcher requests: input
//! validation with messages that say what was expected, raw and typed
//! contents, the classification extension, and a detector's outputs in the
//! layout of TensorRT's EfficientNMS.

use std::collections::HashMap;

use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::model_infer_response::InferOutputTensor;
use oip_proto::inference::{InferParameter, infer_parameter::ParameterChoice};

use crate::backend::Kind;
use crate::batcher::{Images, Request, Response};
use crate::detections::{Detection, Selection};
use crate::error::{InferError, invalid};
use crate::repository::{InputFormat, VersionConfig};

/// Input carrying raw RGB pixels, UINT8 `[N, H, W, 3]`.
pub const PIXELS: &str = "pixels";
/// A detector's input: raw RGB pixels already letterboxed, UINT8 `[N, H, W, 3]`.
pub const IMAGES: &str = "images";
/// Boxes found per image, INT32 `[N, 1]`.
pub const NUM_DETECTIONS: &str = "num_detections";
/// x1, y1, x2, y2 in input pixels, FP32 `[N, K, 4]`; rows past `num_detections` are zero.
pub const DETECTION_BOXES: &str = "detection_boxes";
/// Scores, highest first, FP32 `[N, K]`.
pub const DETECTION_SCORES: &str = "detection_scores";
/// Class indices into the labels, INT32 `[N, K]`.
pub const DETECTION_CLASSES: &str = "detection_classes";
/// Request parameter: the lowest score kept.
pub const SCORE_THRESHOLD: &str = "score_threshold";
/// Request parameter: the overlap above which a box of the same class as a better one is dropped.
pub const IOU_THRESHOLD: &str = "iou_threshold";
/// Request parameter: most boxes per image, and `K` of the outputs.
pub const MAX_DETECTIONS: &str = "max_detections";
/// The largest `max_detections` a request may ask for.
pub const MAX_DETECTIONS_LIMIT: usize = 1000;
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
    NumDetections,
    DetectionBoxes,
    DetectionScores,
    DetectionClasses,
}

impl Output {
    /// Protocol name of the output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Logits => LOGITS,
            Self::Probabilities => PROBABILITIES,
            Self::NumDetections => NUM_DETECTIONS,
            Self::DetectionBoxes => DETECTION_BOXES,
            Self::DetectionScores => DETECTION_SCORES,
            Self::DetectionClasses => DETECTION_CLASSES,
        }
    }

    /// A model's outputs, in the order they are listed and returned when a request names none.
    pub fn of(kind: Kind) -> &'static [Output] {
        match kind {
            Kind::Classification => &[Self::Logits, Self::Probabilities],
            Kind::Detection => &[
                Self::NumDetections,
                Self::DetectionBoxes,
                Self::DetectionScores,
                Self::DetectionClasses,
            ],
        }
    }

    /// Protocol datatype of the output.
    pub fn datatype(self) -> &'static str {
        match self {
            Self::NumDetections | Self::DetectionClasses => "INT32",
            _ => "FP32",
        }
    }

    /// Shape with `-1` for the batch and, for a detector, `-1` for `K` (the request's `max_detections`).
    pub fn shape(self, classes: usize) -> Vec<i64> {
        match self {
            Self::Logits | Self::Probabilities => vec![-1, classes as i64],
            Self::NumDetections => vec![-1, 1],
            Self::DetectionBoxes => vec![-1, -1, 4],
            Self::DetectionScores | Self::DetectionClasses => vec![-1, -1],
        }
    }
}

/// One input a model accepts: its name, datatype, and shape with `-1` for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// The one input a model version takes, as its `input_format` says.
pub fn input_of(kind: Kind, config: &VersionConfig) -> InputSpec {
    match (kind, config.input_format) {
        (Kind::Classification, InputFormat::Pixels) => InputSpec {
            name: PIXELS,
            datatype: "UINT8",
            shape: pixels_shape(config),
        },
        (Kind::Classification, InputFormat::Normalised) => InputSpec {
            name: INPUT,
            datatype: "FP32",
            shape: input_shape(config),
        },
        // Loading refuses a detector with another format.
        (Kind::Detection, _) => InputSpec {
            name: IMAGES,
            datatype: "UINT8",
            shape: pixels_shape(config),
        },
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

/// Checks the inputs, requested outputs and parameters of a ModelInfer request against the model and turns
/// them into a batcher request. Raw bytes and typed FP32 values are moved out of the request, not copied.
pub fn parse(
    inputs: &mut [InferInputTensor],
    raw: Vec<Vec<u8>>,
    outputs: &[InferRequestedOutputTensor],
    parameters: &HashMap<String, InferParameter>,
    kind: Kind,
    config: &VersionConfig,
    max_batch_size: usize,
) -> Result<Parsed, InferError> {
    let expected = input_of(kind, config);
    let described = || {
        format!(
            "`{}` ({} {})",
            expected.name,
            expected.datatype,
            shape_text(&expected.shape)
        )
    };
    let [input] = inputs else {
        return Err(invalid(format!(
            "expected exactly one input, {}; got {}",
            described(),
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
    if input.name != expected.name {
        return Err(invalid(format!(
            "unknown input `{}`; this model takes {}",
            input.name,
            described()
        )));
    }
    if input.datatype != expected.datatype {
        return Err(invalid(format!(
            "input `{}` must be {}, got `{}`",
            input.name, expected.datatype, input.datatype
        )));
    }
    let batch = check_shape(&input.name, &input.shape, &expected.shape, max_batch_size)?;
    let count = batch
        * expected.shape[1..]
            .iter()
            .map(|d| *d as usize)
            .product::<usize>();
    let images = match (expected.datatype, raw) {
        ("UINT8", Some(bytes)) => {
            check_len(&input.name, bytes.len(), count, 1)?;
            Images::Pixels(bytes)
        }
        ("UINT8", None) => {
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
                        "input `{}` has a value above 255 in uint_contents",
                        input.name
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
        Output::of(kind)
            .iter()
            .map(|&output| OutputSpec {
                output,
                classification: None,
            })
            .collect()
    } else {
        outputs
            .iter()
            .map(|o| parse_output(o, kind, config.num_classes))
            .collect::<Result<_, _>>()?
    };
    let selection = match kind {
        Kind::Detection => parse_selection(parameters)?,
        Kind::Classification => Selection::default(),
    };
    Ok(Parsed {
        request: Request {
            batch,
            images,
            selection,
        },
        outputs,
    })
}

/// A detector's request parameters over their defaults. Other parameters (a client's `priority`, `timeout`,
/// ...) are left alone, as Triton leaves them.
fn parse_selection(parameters: &HashMap<String, InferParameter>) -> Result<Selection, InferError> {
    let mut selection = Selection::default();
    let number = |name: &str| -> Result<Option<f64>, InferError> {
        let Some(p) = parameters.get(name) else {
            return Ok(None);
        };
        match p.parameter_choice {
            Some(ParameterChoice::DoubleParam(v)) => Ok(Some(v)),
            Some(ParameterChoice::Int64Param(v)) => Ok(Some(v as f64)),
            Some(ParameterChoice::Uint64Param(v)) => Ok(Some(v as f64)),
            _ => Err(invalid(format!("parameter `{name}` must be a number"))),
        }
    };
    if let Some(v) = number(SCORE_THRESHOLD)? {
        if !(0.0..=1.0).contains(&v) {
            return Err(invalid(format!(
                "parameter `{SCORE_THRESHOLD}` must be between 0 and 1, got {v}"
            )));
        }
        selection.score_threshold = v as f32;
    }
    if let Some(v) = number(IOU_THRESHOLD)? {
        // Checked as the f32 it becomes: a double too small for an f32 would turn into 0.
        if !(v as f32 > 0.0 && v <= 1.0) {
            return Err(invalid(format!(
                "parameter `{IOU_THRESHOLD}` must be above 0 and at most 1, got {v}"
            )));
        }
        selection.iou_threshold = v as f32;
    }
    if let Some(v) = number(MAX_DETECTIONS)? {
        if v.fract() != 0.0 || !(1.0..=MAX_DETECTIONS_LIMIT as f64).contains(&v) {
            return Err(invalid(format!(
                "parameter `{MAX_DETECTIONS}` must be an integer from 1 to {MAX_DETECTIONS_LIMIT}, got {v}"
            )));
        }
        selection.max_detections = v as usize;
    }
    Ok(selection)
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

fn parse_output(
    o: &InferRequestedOutputTensor,
    kind: Kind,
    classes: usize,
) -> Result<OutputSpec, InferError> {
    let available = Output::of(kind);
    let Some(&output) = available.iter().find(|out| out.name() == o.name) else {
        let names: Vec<String> = available
            .iter()
            .map(|o| format!("`{}`", o.name()))
            .collect();
        return Err(invalid(format!(
            "unknown output `{}`; this model has {}",
            o.name,
            names.join(", ")
        )));
    };
    if kind == Kind::Detection && o.parameters.contains_key(CLASSIFICATION) {
        return Err(invalid(format!(
            "output `{}` of a detector has no `{CLASSIFICATION}` parameter; it is for a classifier's outputs",
            o.name
        )));
    }
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

/// Builds the output tensors and their raw contents, in the requested order. A detector's outputs have
/// `max_detections` rows per image, zero past each image's `num_detections`, as EfficientNMS pads them.
pub fn encode(
    outputs: &[OutputSpec],
    batch: usize,
    response: &Response,
    labels: &[String],
    max_detections: usize,
) -> Result<(Vec<InferOutputTensor>, Vec<Vec<u8>>), InferError> {
    outputs
        .iter()
        .map(|spec| match response {
            Response::Classes {
                logits,
                probabilities,
            } => encode_classes(spec, batch, logits, probabilities, labels),
            Response::Detections(found) => encode_detections(spec.output, found, max_detections),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|pairs| pairs.into_iter().unzip())
}

fn encode_classes(
    spec: &OutputSpec,
    batch: usize,
    logits: &[f32],
    probabilities: &[f32],
    labels: &[String],
) -> Result<(InferOutputTensor, Vec<u8>), InferError> {
    let classes = labels.len();
    let values = match spec.output {
        Output::Logits => logits,
        Output::Probabilities => probabilities,
        other => return Err(mismatch(other)),
    };
    Ok(match spec.classification {
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
    })
}

fn encode_detections(
    output: Output,
    found: &[Vec<Detection>],
    k: usize,
) -> Result<(InferOutputTensor, Vec<u8>), InferError> {
    let n = found.len() as i64;
    let kept = |image: &[Detection]| image.len().min(k);
    let mut bytes = Vec::new();
    let shape = match output {
        Output::NumDetections => {
            for image in found {
                bytes.extend_from_slice(&(kept(image) as i32).to_le_bytes());
            }
            vec![n, 1]
        }
        Output::DetectionBoxes => {
            for image in found {
                for d in &image[..kept(image)] {
                    bytes.extend(d.bbox.iter().flat_map(|v| v.to_le_bytes()));
                }
                bytes.resize(bytes.len() + (k - kept(image)) * 16, 0);
            }
            vec![n, k as i64, 4]
        }
        Output::DetectionScores | Output::DetectionClasses => {
            for image in found {
                for d in &image[..kept(image)] {
                    let value = if output == Output::DetectionScores {
                        d.score.to_le_bytes()
                    } else {
                        (d.class as i32).to_le_bytes()
                    };
                    bytes.extend_from_slice(&value);
                }
                bytes.resize(bytes.len() + (k - kept(image)) * 4, 0);
            }
            vec![n, k as i64]
        }
        other => return Err(mismatch(other)),
    };
    Ok((tensor(output.name(), output.datatype(), shape), bytes))
}

/// An output of one kind of model asked of the other's response: parse never lets one through.
fn mismatch(output: Output) -> InferError {
    InferError::Backend(crate::backend::BackendError::Inference(format!(
        "output `{}` is not one this model produces",
        output.name()
    )))
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
            network: None,
            labels: "l".into(),
            num_classes: 4,
            input: InputSize {
                height: 2,
                width: 3,
                channels: 3,
            },
            input_format: InputFormat::Pixels,
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

    /// Parses a request to the classifier of [`config`], without parameters, up to 4 images.
    fn classify(
        inputs: &mut [InferInputTensor],
        raw: Vec<Vec<u8>>,
        outputs: &[InferRequestedOutputTensor],
    ) -> Result<Parsed, InferError> {
        parse(
            inputs,
            raw,
            outputs,
            &none(),
            Kind::Classification,
            &config(),
            4,
        )
    }

    /// Parses a request of one 2x3 image in `images` to a detector, with `params`.
    fn detect(params: &HashMap<String, InferParameter>) -> Result<Parsed, InferError> {
        let mut images = [input(IMAGES, "UINT8", &[1, 2, 3, 3])];
        parse(
            &mut images,
            vec![vec![0; 18]],
            &[],
            params,
            Kind::Detection,
            &config(),
            4,
        )
    }

    fn none() -> HashMap<String, InferParameter> {
        HashMap::new()
    }

    fn err(r: Result<Parsed, InferError>) -> String {
        match r {
            Err(InferError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn raw_pixels_are_accepted_and_moved() {
        let p = classify(
            &mut [input(PIXELS, "UINT8", &[2, 2, 3, 3])],
            vec![vec![7; 36]],
            &[],
        )
        .unwrap();
        assert_eq!(p.request.batch, 2);
        assert!(matches!(p.request.images, Images::Pixels(ref v) if v.len() == 36));
        assert_eq!(p.outputs.len(), 2);
    }

    #[test]
    fn typed_fp32_is_accepted_by_a_normalised_version_only() {
        let fp32 = || {
            let mut t = input(INPUT, "FP32", &[1, 3, 2, 3]);
            t.contents = Some(InferTensorContents {
                fp32_contents: vec![0.5; 18],
                ..Default::default()
            });
            t
        };
        let normalised = VersionConfig {
            input_format: InputFormat::Normalised,
            ..config()
        };
        let p = parse(
            &mut [fp32()],
            vec![],
            &[],
            &none(),
            Kind::Classification,
            &normalised,
            4,
        )
        .unwrap();
        assert!(matches!(p.request.images, Images::Normalised(ref v) if v.len() == 18));
        let m = err(classify(&mut [fp32()], vec![], &[]));
        assert!(
            m.contains("unknown input `input`; this model takes `pixels` (UINT8 [N, 2, 3, 3])"),
            "{m}"
        );
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
            let m = err(classify(
                &mut [input(name, dtype, &shape)],
                vec![vec![0; bytes]],
                &[],
            ));
            for text in expected {
                assert!(
                    m.contains(text),
                    "{name} {dtype} {shape:?}: `{m}` lacks `{text}`"
                );
            }
        }
        let m = err(classify(&mut [], vec![], &[]));
        assert!(m.contains("exactly one input"), "{m}");
    }

    #[test]
    fn raw_and_typed_contents_are_exclusive() {
        let mut t = input(PIXELS, "UINT8", &[1, 2, 3, 3]);
        t.contents = Some(InferTensorContents {
            uint_contents: vec![0; 18],
            ..Default::default()
        });
        let m = err(classify(&mut [t], vec![vec![0; 18]], &[]));
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
        assert!(err(classify(&mut [t], vec![], &[])).contains("above 255"));
    }

    #[test]
    fn classification_parameter_is_checked() {
        let out = |k| InferRequestedOutputTensor {
            name: PROBABILITIES.into(),
            parameters: [(CLASSIFICATION.to_owned(), int64_param(k))].into(),
        };
        let t = || input(PIXELS, "UINT8", &[1, 2, 3, 3]);
        let p = classify(&mut [t()], vec![vec![0; 18]], &[out(2)]).unwrap();
        assert_eq!(
            p.outputs,
            [OutputSpec {
                output: Output::Probabilities,
                classification: Some(2)
            }]
        );
        for k in [0, 5, -1] {
            let m = err(classify(&mut [t()], vec![vec![0; 18]], &[out(k)]));
            assert!(m.contains("from 1 to 4"), "{m}");
        }
    }

    #[test]
    fn classification_encodes_top_k_as_length_prefixed_strings() {
        let labels: Vec<String> = ["a", "b", "c", "d:e"].map(String::from).to_vec();
        let response = Response::Classes {
            logits: vec![0.0; 8],
            probabilities: vec![0.1, 0.2, 0.3, 0.4, 0.7, 0.1, 0.1, 0.1],
        };
        let spec = [OutputSpec {
            output: Output::Probabilities,
            classification: Some(2),
        }];
        let (tensors, raw) = encode(&spec, 2, &response, &labels, 100).unwrap();
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

    fn double(v: f64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::DoubleParam(v)),
        }
    }

    #[test]
    fn a_detector_takes_images_and_its_selection_parameters() {
        let t = || input(IMAGES, "UINT8", &[1, 2, 3, 3]);
        let params: HashMap<String, InferParameter> = [
            (SCORE_THRESHOLD.to_owned(), double(0.5)),
            (IOU_THRESHOLD.to_owned(), double(0.3)),
            (MAX_DETECTIONS.to_owned(), int64_param(7)),
            ("priority".to_owned(), int64_param(1)),
        ]
        .into();
        let p = detect(&params).unwrap();
        assert_eq!(
            p.request.selection,
            Selection {
                score_threshold: 0.5,
                iou_threshold: 0.3,
                max_detections: 7
            }
        );
        let names: Vec<&str> = p.outputs.iter().map(|o| o.output.name()).collect();
        assert_eq!(
            names,
            [
                NUM_DETECTIONS,
                DETECTION_BOXES,
                DETECTION_SCORES,
                DETECTION_CLASSES
            ]
        );
        let defaults = detect(&none());
        assert_eq!(defaults.unwrap().request.selection, Selection::default());

        for (name, value, phrase) in [
            (SCORE_THRESHOLD, double(1.5), "between 0 and 1"),
            (IOU_THRESHOLD, double(0.0), "above 0"),
            // Found by the fuzz target: above 0 as a double, but 0 once made the f32 the NMS compares with.
            (IOU_THRESHOLD, double(1e-300), "above 0"),
            (MAX_DETECTIONS, int64_param(0), "from 1 to 1000"),
            (MAX_DETECTIONS, double(2.5), "an integer"),
            (MAX_DETECTIONS, int64_param(1001), "from 1 to 1000"),
        ] {
            let params = [(name.to_owned(), value)].into();
            let m = err(detect(&params));
            assert!(m.contains(name) && m.contains(phrase), "{m}");
        }
        // A classifier's input, or output, is not a detector's.
        let m = err(parse(
            &mut [input(PIXELS, "UINT8", &[1, 2, 3, 3])],
            vec![vec![0; 18]],
            &[],
            &none(),
            Kind::Detection,
            &config(),
            4,
        ));
        assert!(
            m.contains("unknown input `pixels`") && m.contains("`images`"),
            "{m}"
        );
        let logits = InferRequestedOutputTensor {
            name: LOGITS.into(),
            parameters: Default::default(),
        };
        let m = err(parse(
            &mut [t()],
            vec![vec![0; 18]],
            &[logits],
            &none(),
            Kind::Detection,
            &config(),
            4,
        ));
        assert!(
            m.contains("unknown output `logits`") && m.contains(DETECTION_BOXES),
            "{m}"
        );
    }

    #[test]
    fn detections_encode_in_the_efficient_nms_layout_padded_to_max_detections() {
        let box_ = |class, score, x| Detection {
            class,
            score,
            bbox: [x, 1.0, x + 2.0, 3.0],
        };
        let response = Response::Detections(vec![
            vec![box_(5, 0.9, 10.0), box_(2, 0.8, 20.0), box_(1, 0.7, 30.0)],
            vec![],
        ]);
        let specs: Vec<OutputSpec> = Output::of(Kind::Detection)
            .iter()
            .map(|&output| OutputSpec {
                output,
                classification: None,
            })
            .collect();
        let (tensors, raw) = encode(&specs, 2, &response, &[], 2).unwrap();
        let shapes: Vec<(&str, &str, &[i64])> = tensors
            .iter()
            .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            shapes,
            [
                (NUM_DETECTIONS, "INT32", &[2i64, 1][..]),
                (DETECTION_BOXES, "FP32", &[2, 2, 4][..]),
                (DETECTION_SCORES, "FP32", &[2, 2][..]),
                (DETECTION_CLASSES, "INT32", &[2, 2][..]),
            ]
        );
        let ints = |b: &[u8]| -> Vec<i32> {
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(ints(&raw[0]), [2, 0]);
        assert_eq!(
            floats(&raw[1]),
            [
                10.0, 1.0, 12.0, 3.0, 20.0, 1.0, 22.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            ]
        );
        assert_eq!(floats(&raw[2]), [0.9, 0.8, 0.0, 0.0]);
        assert_eq!(ints(&raw[3]), [5, 2, 0, 0]);
    }
}
