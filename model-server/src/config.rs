//! Command-line and environment configuration of the model server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serves image classifiers from a model repository over the Open Inference
/// Protocol (KServe v2 / Triton gRPC).
#[derive(Debug, Clone, Parser)]
#[command(name = "model-server", version, about)]
pub struct Config {
    /// Directory holding `<model>/<version>/` folders (create the default one
    /// with scripts/setup-model-repository.sh).
    #[arg(long, env = "MODEL_REPOSITORY", default_value = "model-repository")]
    pub model_repository: PathBuf,

    /// Address the gRPC server listens on.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:8001")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP server with `/metrics` (Prometheus), `/v2/health/live` and `/v2/health/ready`, as
    /// Triton's metrics port.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8002")]
    pub http_addr: SocketAddr,

    /// Inference threads; 0 means one per available CPU core.
    #[arg(long, env = "INFERENCE_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Most images in one request and in one model execution.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,

    /// Microseconds a batch that is not full may wait, after its oldest request arrived, for more requests
    /// to join it. 0 runs whatever is waiting as soon as the model is free: on a CPU every core is already busy
    /// with one batch, so waiting adds latency without adding throughput. A GPU gains from a short wait.
    #[arg(
        long = "max-queue-delay",
        env = "MAX_QUEUE_DELAY_US",
        default_value_t = 0,
        value_name = "MICROSECONDS"
    )]
    pub max_queue_delay_us: u64,

    /// Requests that may wait per model version; beyond this new requests
    /// are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_QUEUE_SIZE", default_value_t = 64)]
    pub max_queue_size: usize,

    /// Largest gRPC message received or sent, in bytes (tonic's default is
    /// 4 MiB, less than a batch of 8 FP32 images).
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value_t = 64 * 1024 * 1024)]
    pub max_message_size: usize,

    /// Age in seconds after which a client connection is asked to go away (HTTP/2 GOAWAY; calls in
    /// flight finish), so long-lived clients reconnect, re-resolve and rebalance. 0 keeps connections
    /// for ever.
    #[arg(long, env = "MAX_CONNECTION_AGE_SECS", default_value_t = 300)]
    pub max_connection_age_secs: u64,

    /// Seconds a connection past its maximum age has to finish its calls before it is closed.
    #[arg(long, env = "MAX_CONNECTION_AGE_GRACE_SECS", default_value_t = 30)]
    pub max_connection_age_grace_secs: u64,

    /// After SIGTERM, seconds that calls in flight and queued may take to finish before the server
    /// exits anyway. Health turns NOT_SERVING and new calls are refused at once.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Write logs as JSON lines instead of human-readable text.
    #[arg(long, env = "JSON_LOGS")]
    pub json_logs: bool,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Checks rules that span fields or that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_size == 0 {
            return Err(ConfigError("--max-batch-size must be at least 1".into()));
        }
        if self.max_queue_size == 0 {
            return Err(ConfigError("--max-queue-size must be at least 1".into()));
        }
        if self.max_queue_delay_us > 10_000_000 {
            return Err(ConfigError(
                "--max-queue-delay is in microseconds and at most 10000000 (10 s)".into(),
            ));
        }
        if self.max_message_size < 1024 * 1024 {
            return Err(ConfigError(
                "--max-message-size must be at least 1 MiB (1048576)".into(),
            ));
        }
        Ok(())
    }

    /// The number of inference threads to start.
    pub fn inference_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}
