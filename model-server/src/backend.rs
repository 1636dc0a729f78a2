//! The model backend seam: a synchronous classifier that runs on the inference
//! thread pool, never on a tokio worker.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use crate::models::efficientnet::EfficientNetLite0;

/// Errors from loading or running a model. `Clone` so that one failed batch
/// can fail every request that was in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("unknown architecture `{0}` (supported: efficientnet-lite0)")]
    UnknownArchitecture(String),
    #[error("loading weights: {0}")]
    Load(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// An image classifier: normalised f32 `[N, 3, H, W]` in, logits `[N, classes]` out.
pub trait Classifier: Send + Sync {
    /// Runs the network on a batch.
    fn logits(&self, x: &Tensor) -> Result<Tensor, BackendError>;
}

impl Classifier for EfficientNetLite0 {
    fn logits(&self, x: &Tensor) -> Result<Tensor, BackendError> {
        let x = x
            .to_device(self.device())
            .map_err(|e| BackendError::Inference(e.to_string()))?;
        self.forward(&x)
            .map_err(|e| BackendError::Inference(e.to_string()))
    }
}

/// Builds the classifier named by a version's `architecture`, computing in `dtype` on `device`.
pub fn load(
    architecture: &str,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Classifier>, BackendError> {
    match architecture {
        "efficientnet-lite0" => EfficientNetLite0::load_as(weights, device, dtype)
            .map(|m| Box::new(m) as Box<dyn Classifier>)
            .map_err(|e| BackendError::Load(format!("{}: {e}", weights.display()))),
        other => Err(BackendError::UnknownArchitecture(other.to_owned())),
    }
}
