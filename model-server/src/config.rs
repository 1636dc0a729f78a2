//! Command-line and environment configuration of the model server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use candle_core::{DType, Device};
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

    /// Inference threads; 0 means one per available CPU core. With several instances they are divided among
    /// them: each instance runs on its own pool of `threads / instances` threads (at least one).
    #[arg(long, env = "INFERENCE_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Instances of each model version (Triton's `instance_group`): copies of the execution context that run
    /// batches side by side, each on its own share of `--threads`, all sharing one copy of the weights; a batch
    /// that is a version's only work borrows the idle instances' threads. 0 means one per inference thread on the
    /// CPU and one on CUDA. A version's `config.json` can override it with `"instance_group": {"count": N}`.
    #[arg(long, env = "INSTANCES", default_value_t = 0)]
    pub instances: usize,

    /// Where inference runs: `cpu`, `cuda` (the first GPU) or `cuda:N`. CUDA needs a server built with
    /// `--features cuda`.
    #[arg(long, env = "DEVICE", default_value = "cpu", value_parser = DeviceChoice::from_str)]
    pub device: DeviceChoice,

    /// Precision: `f32`; `f16`/`bf16` on CUDA; `bf16` on a CPU with AVX512-BF16 (products in bf16, sums in
    /// f32). The logits are returned as f32 either way.
    #[arg(long, env = "DTYPE", default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,

    /// Most images in one request and in one model execution [default: 8 on the CPU, 32 on CUDA].
    #[arg(long, env = "MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Microseconds a batch that is not full may wait, after its oldest request arrived, for more requests
    /// to join it. 0 runs whatever is waiting as soon as the model is free: on a CPU every core is already busy
    /// with one batch, so waiting adds latency without adding throughput, while a GPU runs a batch of 32 in
    /// about the time of one image [default: 0 on the CPU, 2000 on CUDA].
    #[arg(
        long = "max-queue-delay",
        env = "MAX_QUEUE_DELAY_US",
        value_name = "MICROSECONDS"
    )]
    pub max_queue_delay_us: Option<u64>,

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

    /// PEM certificate chain of the gRPC port: with `--tls-key`, gRPC is served over TLS only. The HTTP port
    /// (metrics, probes, REST) stays plain text, for scrapers and probes inside the cluster.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates for mutual TLS: clients must present a certificate signed by one of them.
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// After SIGTERM, seconds that calls in flight and queued may take to finish before the server
    /// exits anyway. Health turns NOT_SERVING and new calls are refused at once.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// What may change the models served after start-up, as Triton names it: `none` (what the repository holds
    /// at start is served until exit), `poll` (the repository is scanned again every `--repository-poll-secs`;
    /// versions that appear, change or go are loaded, reloaded or unloaded) or `explicit` (only
    /// RepositoryModelLoad / RepositoryModelUnload, over gRPC or HTTP, change what is served).
    #[arg(long, env = "MODEL_CONTROL_MODE", value_enum, default_value_t = ControlMode::None)]
    pub model_control_mode: ControlMode,

    /// Seconds between two scans of the repository in `poll` mode. A version directory is loaded only once
    /// its files have stayed the same from one scan to the next.
    #[arg(long, env = "REPOSITORY_POLL_SECS", default_value_t = 15.0)]
    pub repository_poll_secs: f64,

    /// In `explicit` mode, a model to load at start-up (repeatable; `*` loads every model). Without it an
    /// explicit-mode server starts with no model and waits for load calls.
    #[arg(long = "load-model", env = "LOAD_MODEL", value_delimiter = ',')]
    pub load_models: Vec<String>,

    /// Write logs as JSON lines instead of human-readable text.
    #[arg(long, env = "JSON_LOGS")]
    pub json_logs: bool,
}

/// `--model-control-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlMode {
    /// What the repository holds at start-up is served until exit.
    None,
    /// The repository is scanned again at an interval.
    Poll,
    /// Load and unload calls decide what is served.
    Explicit,
}

impl std::fmt::Display for ControlMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Poll => "poll",
            Self::Explicit => "explicit",
        })
    }
}

/// Most instances of one model version: each is an OS thread and a thread pool, so far more than there are
/// cores only costs memory and switching.
pub const MAX_INSTANCES: usize = 64;

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Checks rules that span fields or that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_size() == 0 {
            return Err(ConfigError("--max-batch-size must be at least 1".into()));
        }
        if self.instances > MAX_INSTANCES {
            return Err(ConfigError(format!(
                "--instances must be between 1 and {MAX_INSTANCES}, or 0 for one per inference thread, got {}",
                self.instances
            )));
        }
        if self.max_queue_size == 0 {
            return Err(ConfigError("--max-queue-size must be at least 1".into()));
        }
        if self.device == DeviceChoice::Cpu {
            check_cpu_dtype(&self.dtype, crate::kernels::isa::Isa::has_bf16())?;
        }
        if self.max_queue_delay().as_micros() > 10_000_000 {
            return Err(ConfigError(
                "--max-queue-delay is in microseconds and at most 10000000 (10 s)".into(),
            ));
        }
        if !(0.05..=86_400.0).contains(&self.repository_poll_secs) {
            return Err(ConfigError(format!(
                "--repository-poll-secs must be between 0.05 and 86400, got {}",
                self.repository_poll_secs
            )));
        }
        if !self.load_models.is_empty() && self.model_control_mode != ControlMode::Explicit {
            return Err(ConfigError(format!(
                "--load-model applies to --model-control-mode explicit only (the mode is {}, which serves \
                 every model of the repository)",
                self.model_control_mode
            )));
        }
        if self.max_message_size < 1024 * 1024 {
            return Err(ConfigError(
                "--max-message-size must be at least 1 MiB (1048576)".into(),
            ));
        }
        Ok(())
    }

    /// `--max-batch-size`, or the device's default.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size.unwrap_or(match self.device {
            DeviceChoice::Cpu => 8,
            DeviceChoice::Cuda(_) => 32,
        })
    }

    /// `--max-queue-delay`, or the device's default.
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_micros(self.max_queue_delay_us.unwrap_or(match self.device {
            DeviceChoice::Cpu => 0,
            DeviceChoice::Cuda(_) => 2_000,
        }))
    }

    /// `--repository-poll-secs` as a duration.
    pub fn repository_poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.repository_poll_secs)
    }

    /// The element type the model computes in.
    pub fn dtype(&self) -> DType {
        // clap has already refused any other name.
        parse_dtype(&self.dtype).unwrap_or(DType::F32)
    }

    /// Instances of a version whose `config.json` sets none: `--instances`, or for 0 one per inference thread on
    /// the CPU (a lone request still gets every thread, borrowed from the idle instances) and one on CUDA, where
    /// the device does the work.
    pub fn instance_count(&self) -> usize {
        match (self.instances, &self.device) {
            (0, DeviceChoice::Cpu) => self.inference_threads().min(MAX_INSTANCES),
            (0, DeviceChoice::Cuda(_)) => 1,
            (n, _) => n,
        }
    }

    /// The number of inference threads to start, shared out among the instances.
    pub fn inference_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Whether the CPU computes in `dtype`: f32 always, bf16 only with AVX512-BF16 (`cpu_bf16`).
fn check_cpu_dtype(dtype: &str, cpu_bf16: bool) -> Result<(), ConfigError> {
    match dtype {
        "f32" => Ok(()),
        "bf16" if cpu_bf16 => Ok(()),
        "bf16" => Err(ConfigError(
            "--dtype bf16 on the CPU needs AVX512-BF16, which this CPU does not have: use --dtype f32, or \
             --device cuda"
                .into(),
        )),
        other => Err(ConfigError(format!(
            "--dtype {other} needs --device cuda: the CPU computes in f32, or bf16 where it has AVX512-BF16"
        ))),
    }
}

/// The device `--device` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{text}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

/// The element type a `--dtype` name stands for.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

impl DeviceChoice {
    /// Opens the device; CUDA is refused with a reason when this build lacks it or no such GPU answers.
    pub fn open(self) -> Result<Device, ConfigError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(_) if !candle_core::utils::cuda_is_available() => Err(ConfigError(
                "--device cuda: this model server was built without CUDA; build it with `--features cuda` \
                 (or use the CUDA image)"
                    .into(),
            )),
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                ConfigError(format!(
                    "--device cuda:{n}: no usable GPU ({e}); check `nvidia-smi` and, in a container, that \
                     it was started with GPUs (`docker run --gpus all`)"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("model-server").chain(args.iter().copied()))
    }

    #[test]
    fn control_mode_defaults_to_none_and_load_model_needs_explicit() {
        let plain = config(&[]).unwrap();
        assert_eq!(plain.model_control_mode, ControlMode::None);
        assert_eq!(plain.repository_poll_interval(), Duration::from_secs(15));
        assert!(plain.load_models.is_empty());
        let explicit = config(&[
            "--model-control-mode",
            "explicit",
            "--load-model",
            "a,b",
            "--load-model",
            "c",
        ])
        .unwrap();
        assert_eq!(explicit.load_models, ["a", "b", "c"]);
        explicit.validate().unwrap();
        let e = config(&["--model-control-mode", "poll", "--load-model", "a"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--load-model applies to --model-control-mode explicit"),
            "{e}"
        );
        let e = config(&["--repository-poll-secs", "0"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--repository-poll-secs must be between"), "{e}");
        assert!(config(&["--model-control-mode", "sometimes"]).is_err());
    }

    #[test]
    fn devices_parse_and_defaults_follow_the_device() {
        let cpu = config(&[]).unwrap();
        assert_eq!(cpu.device, DeviceChoice::Cpu);
        assert_eq!(
            (cpu.max_batch_size(), cpu.max_queue_delay()),
            (8, Duration::ZERO)
        );
        let gpu = config(&["--device", "cuda:1"]).unwrap();
        assert_eq!(gpu.device, DeviceChoice::Cuda(1));
        assert_eq!(
            (gpu.max_batch_size(), gpu.max_queue_delay()),
            (32, Duration::from_millis(2))
        );
        assert_eq!(
            config(&["--device", "CUDA"]).unwrap().device,
            DeviceChoice::Cuda(0)
        );
        let set = config(&[
            "--device",
            "cuda",
            "--max-batch-size",
            "4",
            "--max-queue-delay",
            "0",
        ])
        .unwrap();
        assert_eq!(
            (set.max_batch_size(), set.max_queue_delay()),
            (4, Duration::ZERO)
        );
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = config(&["--device", bad]).unwrap_err().to_string();
            assert!(e.contains("use cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn instances_default_to_one_per_thread_on_the_cpu_and_must_be_at_most_64() {
        let default = config(&[]).unwrap();
        assert!(default.validate().is_ok());
        assert_eq!(default.instance_count(), default.inference_threads());
        let four = config(&["--threads", "4"]).unwrap();
        assert_eq!(four.instance_count(), 4);
        let many = config(&["--threads", "100"]).unwrap();
        assert_eq!(many.instance_count(), MAX_INSTANCES);
        let gpu = config(&["--device", "cuda"]).unwrap();
        assert_eq!(gpu.instance_count(), 1);
        let two = config(&["--instances", "2", "--threads", "8"]).unwrap();
        assert_eq!((two.instance_count(), two.inference_threads()), (2, 8));
        assert!(two.validate().is_ok());
        let e = config(&["--instances", "65"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--instances must be between 1 and 64, or 0 for one per inference thread"),
            "{e}"
        );
        assert!(config(&["--instances", "-1"]).is_err());
    }

    #[test]
    fn half_precision_is_refused_on_the_cpu() {
        let e = config(&["--dtype", "f16"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dtype f16 needs --device cuda"), "{e}");
        assert!(
            config(&["--dtype", "bf16", "--device", "cuda"])
                .unwrap()
                .validate()
                .is_ok()
        );
        assert!(config(&["--dtype", "f64"]).is_err());
    }

    #[test]
    fn bf16_on_the_cpu_needs_the_instructions() {
        assert!(check_cpu_dtype("f32", false).is_ok());
        assert!(check_cpu_dtype("bf16", true).is_ok());
        let e = check_cpu_dtype("bf16", false).unwrap_err().to_string();
        assert!(
            e.contains("needs AVX512-BF16") && e.contains("--dtype f32"),
            "{e}"
        );
        let e = check_cpu_dtype("f16", true).unwrap_err().to_string();
        assert!(e.contains("--dtype f16 needs --device cuda"), "{e}");
        // What this CPU gets follows from what it has.
        let here = config(&["--dtype", "bf16"]).unwrap().validate();
        assert_eq!(
            here.is_ok(),
            crate::kernels::isa::Isa::has_bf16(),
            "{here:?}"
        );
    }

    #[test]
    fn cuda_is_refused_clearly_when_it_cannot_run() {
        // On a machine with a GPU and a CUDA build this opens the device; elsewhere it says why not.
        if let Err(e) = DeviceChoice::Cuda(0).open() {
            let e = e.to_string();
            assert!(
                e.contains("built without CUDA") || e.contains("no usable GPU"),
                "{e}"
            );
        }
        assert!(matches!(DeviceChoice::Cpu.open(), Ok(Device::Cpu)));
    }
}
