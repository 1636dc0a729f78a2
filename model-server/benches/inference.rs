//! Model-only CPU inference time of EfficientNet-Lite0: batch-1 latency and
//! batch-8 throughput, run inside a dedicated rayon pool as the server does.
//!
//! `cargo bench -p model-server --bench inference -- [--threads N] [--runs N] [--trials N] [--batches 1,8] [--json PATH]
//! [--device cpu|cuda[:N]] [--dtype f32|f16|bf16] [--cpu-kernels auto|avx512|avx2-fma|portable]` (CUDA needs
//! `--features cuda`)
//! Needs the model repository (MODEL_REPOSITORY, default ./model-repository).
//! Each trial times `runs` forward passes after a warm-up; the figure quoted
//! is the median of the trial medians, with the range, as numbers on a
//! shared machine drift between trials. `--json` also writes them for
//! `scripts/bench.sh`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Module, Tensor};
use model_server::config::{DeviceChoice, parse_dtype};
use model_server::kernels::isa::Isa;
use model_server::models::efficientnet::EfficientNetLite0;

// The server's allocator, so allocation costs are the server's too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn number(name: &str, default: usize) -> anyhow::Result<usize> {
    arg(name).map_or(Ok(default), |v| {
        v.parse()
            .map_err(|_| anyhow::anyhow!("{name} wants a whole number, not {v:?}"))
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let threads = number("--threads", 2)?;
    let runs = number("--runs", 20)?.max(1);
    let trials = number("--trials", 3)?.max(1);
    let batches = arg("--batches")
        .unwrap_or_else(|| "1,8".into())
        .split(',')
        .map(|b| b.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow::anyhow!("--batches wants a list like 1,8"))?;
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
    let device_name = arg("--device").unwrap_or_else(|| "cpu".into());
    let device = device_name
        .parse::<DeviceChoice>()
        .map_err(anyhow::Error::msg)?
        .open()?;
    let dtype_name = arg("--dtype").unwrap_or_else(|| "f32".into());
    let Some(dtype) = parse_dtype(&dtype_name) else {
        anyhow::bail!("--dtype wants f32, f16 or bf16, not {dtype_name}");
    };
    let mut model = pool.install(|| EfficientNetLite0::load_as(&weights, &device, dtype))?;
    if let Some(name) = arg("--cpu-kernels").filter(|n| n != "auto") {
        model = model.with_cpu_kernels(Isa::parse_available(&name).map_err(anyhow::Error::msg)?);
    }
    let kernels = model.cpu_kernels().map_or("candle layers", Isa::name);
    println!(
        "EfficientNet-Lite0, {device_name} {dtype:?} ({kernels}), {threads} threads, {trials} trials x {runs} runs"
    );
    let mut results = Vec::new();
    for batch in batches {
        let x = Tensor::randn(0f32, 1f32, (batch, 3, 224, 224), &device)?;
        let mut trial_medians = Vec::new();
        for _ in 0..trials {
            let mut times = Vec::with_capacity(runs);
            pool.install(|| -> candle_core::Result<()> {
                for _ in 0..3 {
                    model.forward(&x)?;
                }
                device.synchronize()?;
                for _ in 0..runs {
                    let t = Instant::now();
                    model.forward(&x)?;
                    // A GPU returns before the work is done: time it to the end.
                    device.synchronize()?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(())
            })?;
            trial_medians.push(median(&mut times));
        }
        let lo = trial_medians.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = trial_medians.iter().copied().fold(0.0, f64::max);
        let med = median(&mut trial_medians.clone());
        let images_per_s = batch as f64 * 1e3 / med;
        println!(
            "batch {batch}: median {med:.1} ms (trial medians {lo:.1}..{hi:.1}) = {images_per_s:.1} img/s"
        );
        results.push(serde_json::json!({
            "batch": batch,
            "median_ms": med,
            "trial_medians_ms": trial_medians,
            "images_per_s": images_per_s,
        }));
    }
    if let Some(path) = arg("--json") {
        let report = serde_json::json!({
            "runtime": "candle (this project)",
            "device": device_name,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "kernels": kernels,
            "threads": threads,
            "runs": runs,
            "trials": trials,
            "results": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
