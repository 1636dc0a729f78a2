//! Request errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

use crate::backend::BackendError;

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("model `{0}` is not in the repository")]
    ModelNotFound(String),
    #[error("model `{model}` has no version `{version}` (available: {available})")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("model `{model}` version {version} is not ready: {reason}")]
    NotReady {
        model: String,
        version: u64,
        reason: String,
    },
    #[error("the inference queue of model `{0}` is full; retry later")]
    QueueFull(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "model control is `{0}`: load and unload calls need a server started with --model-control-mode explicit"
    )]
    ControlDisabled(String),
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl InferError {
    /// The gRPC code for this error: the single table used by the service.
    pub fn code(&self) -> Code {
        match self {
            Self::ModelNotFound(_) | Self::VersionNotFound { .. } => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotReady { .. } | Self::ShuttingDown => Code::Unavailable,
            Self::QueueFull(_) => Code::ResourceExhausted,
            Self::ControlDisabled(_) => Code::FailedPrecondition,
            Self::Backend(_) | Self::LoadFailed { .. } => Code::Internal,
        }
    }

    /// The HTTP status for this error, for the model server's REST paths: the same table as [`Self::code`].
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::NotFound => 404,
            Code::InvalidArgument => 400,
            Code::FailedPrecondition => 403,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            _ => 500,
        }
    }
}

impl From<InferError> for Status {
    fn from(e: InferError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Shorthand for an INVALID_ARGUMENT error.
pub fn invalid(msg: impl Into<String>) -> InferError {
    InferError::InvalidArgument(msg.into())
}
