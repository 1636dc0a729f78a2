//! Model-only inference time of EfficientNet-Lite0 or YOLOv3-tiny: batch-1
//! latency and batch-8 throughput, run inside a dedicated rayon pool as the
//! server does.
//!
//! `cargo bench -p model-server --bench inference -- [--model efficientnet-lite0|yolov3-tiny] [--threads N] [--runs N]
//! [--trials N] [--batches 1,8] [--json PATH] [--device cpu|cuda[:N]] [--dtype f32|f16|bf16]
//! [--cpu-kernels auto|avx512|avx2-fma|portable]` (CUDA needs `--features cuda`; YOLOv3-tiny runs in f32 with the
//! kernels the CPU has)
//! EfficientNet needs the model repository (MODEL_REPOSITORY, default ./model-repository); YOLOv3-tiny the
//! official darknet files (DARKNET_DIR, default ./.cache/yolov3-tiny, from scripts/setup-model-repository.sh).
//! Each trial times `runs` forward passes after a warm-up; the figure quoted
//! is the median of the trial medians, with the range, as numbers on a
//! shared machine drift between trials. `--json` also writes them for
//! `scripts/bench.sh`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use model_server::config::{DeviceChoice, parse_dtype};
use model_server::convert::darknet;
use model_server::kernels::isa::Isa;
use model_server::models::efficientnet::EfficientNetLite0;
use model_server::models::yolo::Yolo;

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

/// A data path from `var`, or `default` under the working directory, or under the workspace root when the
/// bench runs from the crate's directory.
fn data_path(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if path.is_relative() && !path.exists() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path)
    } else {
        path
    }
}

/// The network under test.
enum Model {
    EfficientNet(EfficientNetLite0),
    Yolo(Yolo),
}

impl Model {
    /// A random batch of the network's input: normalised values for the classifier, [0, 1] for the detector.
    fn input(&self, batch: usize, size: usize, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::EfficientNet(_) => Tensor::randn(0f32, 1f32, (batch, 3, size, size), device),
            Self::Yolo(_) => Tensor::rand(0f32, 1f32, (batch, 3, size, size), device),
        }
    }

    fn run(&self, x: &Tensor) -> candle_core::Result<()> {
        match self {
            Self::EfficientNet(m) => m.forward(x).map(drop),
            Self::Yolo(m) => m.forward(x).map(drop),
        }
    }
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
    let model_name = arg("--model").unwrap_or_else(|| "efficientnet-lite0".into());
    let (model, kernels, size, title) = match model_name.as_str() {
        "efficientnet-lite0" => {
            let weights = data_path("MODEL_REPOSITORY", "model-repository")
                .join("efficientnet-lite0/1/model.safetensors");
            let mut model =
                pool.install(|| EfficientNetLite0::load_as(&weights, &device, dtype))?;
            if let Some(name) = arg("--cpu-kernels").filter(|n| n != "auto") {
                model = model
                    .with_cpu_kernels(Isa::parse_available(&name).map_err(anyhow::Error::msg)?);
            }
            let kernels = model.cpu_kernels().map_or("candle layers", Isa::name);
            (
                Model::EfficientNet(model),
                kernels,
                224,
                "EfficientNet-Lite0",
            )
        }
        "yolov3-tiny" => {
            if dtype != candle_core::DType::F32 {
                anyhow::bail!("YOLOv3-tiny runs in f32 only");
            }
            let dir = data_path("DARKNET_DIR", ".cache/yolov3-tiny");
            let (mut network, weights) = darknet::read(
                &dir.join("yolov3-tiny.cfg"),
                &dir.join("yolov3-tiny.weights"),
            )?;
            darknet::correct_yolov3_tiny_mask(&mut network);
            let kernels = if device.is_cpu() {
                Isa::detect().name()
            } else {
                "candle layers"
            };
            let yolo = Yolo::new(network, weights, &device)?;
            (Model::Yolo(yolo), kernels, 416, "YOLOv3-tiny")
        }
        other => anyhow::bail!("--model wants efficientnet-lite0 or yolov3-tiny, not {other}"),
    };
    println!(
        "{title}, {device_name} {dtype:?} ({kernels}), {threads} threads, {trials} trials x {runs} runs"
    );
    let mut results = Vec::new();
    for batch in batches {
        let x = model.input(batch, size, &device)?;
        let mut trial_medians = Vec::new();
        for _ in 0..trials {
            let mut times = Vec::with_capacity(runs);
            pool.install(|| -> candle_core::Result<()> {
                for _ in 0..3 {
                    model.run(&x)?;
                }
                device.synchronize()?;
                for _ in 0..runs {
                    let t = Instant::now();
                    model.run(&x)?;
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
            "model": model_name,
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
