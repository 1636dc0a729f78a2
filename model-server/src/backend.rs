//! The model backend seam: a synchronous model that runs on the inference thread pool, never on a tokio
//! worker, and the one place that knows which architecture is which kind of model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::convert::darknet::{ConvWeights, DarknetError, Network};
use crate::detections::{Detection, Selection};
use crate::models::efficientnet::EfficientNetLite0;
use crate::models::yolo::Yolo;
use crate::repository::{InputFormat, VersionConfig};

/// Errors from loading or running a model. `Clone` so that one failed batch
/// can fail every request that was in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("unknown architecture `{0}` (supported: efficientnet-lite0, yolov3-tiny)")]
    UnknownArchitecture(String),
    #[error("loading weights: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What a model does with an image, which decides its protocol tensors and the gateway route that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Scores every class: logits and probabilities `[N, classes]`.
    Classification,
    /// Finds objects: boxes, scores and classes per image.
    Detection,
}

impl Kind {
    /// The kind of model an architecture is.
    pub fn of(architecture: &str) -> Result<Self, BackendError> {
        match architecture {
            "efficientnet-lite0" => Ok(Self::Classification),
            "yolov3-tiny" => Ok(Self::Detection),
            other => Err(BackendError::UnknownArchitecture(other.to_owned())),
        }
    }
}

/// What a model answers for a batch.
#[derive(Debug)]
pub enum Outputs {
    /// Class scores, `[N, classes]`.
    Logits(Tensor),
    /// Each image's detections, highest score first.
    Detections(Vec<Vec<Detection>>),
}

/// A network behind the seam: normalised f32 `[N, 3, H, W]` in.
pub trait Model: Send + Sync {
    /// Runs the network on a batch; `selections` has one entry per image, what a detector keeps of it
    /// (a classifier ignores them).
    fn run(&self, x: &Tensor, selections: &[Selection]) -> Result<Outputs, BackendError>;
}

fn inference(e: candle_core::Error) -> BackendError {
    BackendError::Inference(e.to_string())
}

impl Model for EfficientNetLite0 {
    fn run(&self, x: &Tensor, _: &[Selection]) -> Result<Outputs, BackendError> {
        let x = x.to_device(self.device()).map_err(inference)?;
        self.forward(&x).map(Outputs::Logits).map_err(inference)
    }
}

impl Model for Yolo {
    fn run(&self, x: &Tensor, selections: &[Selection]) -> Result<Outputs, BackendError> {
        let x = x.to_device(self.device()).map_err(inference)?;
        self.detect(&x, selections)
            .map(Outputs::Detections)
            .map_err(inference)
    }
}

/// Builds the model a version directory describes, computing in `dtype` on `device` (darknet networks compute
/// in f32 whatever `dtype` is).
pub fn load(
    config: &VersionConfig,
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Model>, BackendError> {
    let weights = dir.join(&config.weights);
    let failed =
        |e: &dyn std::fmt::Display| BackendError::Load(format!("{}: {e}", weights.display()));
    match Kind::of(&config.architecture)? {
        Kind::Classification => EfficientNetLite0::load_as(&weights, device, dtype)
            .map(|m| Box::new(m) as Box<dyn Model>)
            .map_err(|e| failed(&e)),
        Kind::Detection if config.input_format != InputFormat::Pixels => {
            Err(BackendError::Load(format!(
                "{}: a detector takes `pixels` only; remove `input_format` from its config.json",
                dir.display()
            )))
        }
        Kind::Detection => {
            let Some(network) = &config.network else {
                return Err(BackendError::Load(format!(
                    "{}: config.json names no `network` (the darknet cfg) for {}",
                    dir.display(),
                    config.architecture
                )));
            };
            let cfg = dir.join(network);
            let text = std::fs::read_to_string(&cfg)
                .map_err(|e| BackendError::Load(format!("{}: {e}", cfg.display())))?;
            let network = Network::parse(&text)
                .map_err(|e| BackendError::Load(format!("{}: {e}", cfg.display())))?;
            let tensors =
                candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| failed(&e))?;
            let convs = read_convolutions(&network, tensors).map_err(|e| failed(&e))?;
            Yolo::new(network, convs, device)
                .map(|m| Box::new(m) as Box<dyn Model>)
                .map_err(|e| failed(&e))
        }
    }
}

/// The convolutions' parameters from a repository's safetensors file, each tensor checked against the size the
/// cfg gives it; a tensor missing, of the wrong size, or left over is an error naming it.
fn read_convolutions(
    network: &Network,
    mut tensors: HashMap<String, Tensor>,
) -> Result<Vec<ConvWeights>, String> {
    let convs = network
        .convolutions(|layer, part, count| {
            let name = part.tensor_name(layer);
            let wrong = |message: String| DarknetError::Layers { layer, message };
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| wrong(format!("no tensor `{name}` ({})", part.description())))?;
            if tensor.elem_count() != count {
                return Err(wrong(format!(
                    "tensor `{name}` has {} values, the cfg needs {count}",
                    tensor.elem_count()
                )));
            }
            tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| wrong(format!("tensor `{name}`: {e}")))
        })
        .map_err(|e| e.to_string())?;
    let mut extra: Vec<String> = tensors.into_keys().collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(format!(
            "{} tensors the cfg has no place for, e.g. `{first}`: the weights belong to another cfg",
            extra.len()
        ));
    }
    Ok(convs)
}
