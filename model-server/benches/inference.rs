//! Model-only CPU inference time of EfficientNet-Lite0: batch-1 latency and
//! batch-8 throughput, run inside a dedicated rayon pool as the server does.
//!
//! `cargo bench -p model-server --bench inference -- [--threads N] [--runs N] [--trials N]`
//! Needs the model repository (MODEL_REPOSITORY, default ./model-repository).
//! Each trial times `runs` forward passes after a warm-up; the figure quoted
//! is the median of the trial medians, with the range, as numbers on a
//! shared machine drift between trials.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use model_server::efficientnet::EfficientNetLite0;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let threads = arg("--threads", 2);
    let runs = arg("--runs", 20);
    let trials = arg("--trials", 3);
    let repo = std::env::var_os("MODEL_REPOSITORY")
        .map_or_else(|| PathBuf::from("model-repository"), PathBuf::from);
    let repo = if repo.is_relative() && !repo.exists() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(repo)
    } else {
        repo
    };
    let weights = repo.join("efficientnet-lite0/1/model.safetensors");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let model = pool.install(|| EfficientNetLite0::load(&weights, &Device::Cpu))?;
    println!("EfficientNet-Lite0, candle CPU, {threads} threads, {trials} trials x {runs} runs");
    for batch in [1usize, 8] {
        let x = Tensor::randn(0f32, 1f32, (batch, 3, 224, 224), &Device::Cpu)?;
        let mut trial_medians = Vec::new();
        for _ in 0..trials {
            let mut times = Vec::with_capacity(runs);
            pool.install(|| -> candle_core::Result<()> {
                for _ in 0..3 {
                    model.forward(&x)?;
                }
                for _ in 0..runs {
                    let t = Instant::now();
                    model.forward(&x)?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(())
            })?;
            trial_medians.push(median(&mut times));
        }
        let lo = trial_medians.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = trial_medians.iter().copied().fold(0.0, f64::max);
        let med = median(&mut trial_medians);
        println!(
            "batch {batch}: median {med:.1} ms (trial medians {lo:.1}..{hi:.1}) = {:.1} img/s",
            batch as f64 * 1e3 / med
        );
    }
    Ok(())
}
