//! Numerics: the candle EfficientNet-Lite0 against logits computed by an
//! independent numpy implementation (testdata/golden).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::*;
use model_server::kernels::isa::Isa;
use model_server::models::efficientnet::EfficientNetLite0;

/// A float32 forward pass agrees with the float64 reference to ~1e-5; 1e-3
/// leaves room for summation order, and is far below what a wrong padding
/// (2.1) or BatchNorm epsilon (1.2) costs.
const TOLERANCE: f32 = 1e-3;

/// A batch runs the same arithmetic in a different summation order (the
/// matrix kernels block differently by batch size): a few 1e-6 apart.
const BATCH_TOLERANCE: f32 = 5e-5;

fn logits(model: &EfficientNetLite0, input: &[f32], batch: usize) -> Vec<f32> {
    let x = Tensor::from_slice(input, (batch, 3, 224, 224), &Device::Cpu).expect("input");
    model
        .forward(&x)
        .and_then(|y| y.flatten_all()?.to_vec1())
        .expect("forward")
}

#[test]
fn matches_golden_logits_single_and_batched() {
    let pool = pool();
    let model = pool
        .install(|| EfficientNetLite0::load(&weights(), &Device::Cpu))
        .expect("load model");
    let mut inputs = vec![
        ("synthetic_splitmix0", splitmix_input()),
        ("zeros", vec![0.0; 3 * 224 * 224]),
    ];
    for (name, _) in PHOTOS {
        inputs.push((name, normalise(&golden_pixels(name))));
    }
    let mut singles = Vec::new();
    for (name, input) in &inputs {
        let got = pool.install(|| logits(&model, input, 1));
        let diff = max_abs_diff(&got, &golden_logits(name));
        println!("{name}: max abs diff to golden logits {diff:.2e}");
        assert!(
            diff < TOLERANCE,
            "{name}: max abs diff {diff} ≥ {TOLERANCE}"
        );
        singles.push(got);
    }
    for ((name, expected), got) in PHOTOS.iter().zip(&singles[2..]) {
        assert_eq!(argmax(got), *expected, "{name}: wrong top-1 class");
    }

    let flat: Vec<f32> = inputs.iter().flat_map(|(_, x)| x.iter().copied()).collect();
    let batched = pool.install(|| logits(&model, &flat, inputs.len()));
    for (i, single) in singles.iter().enumerate() {
        let row = &batched[i * 1000..(i + 1) * 1000];
        let diff = max_abs_diff(row, single);
        println!(
            "{}: batch of {} vs single, max abs diff {diff:.2e}",
            inputs[i].0,
            inputs.len()
        );
        assert!(
            diff <= BATCH_TOLERANCE,
            "{}: batched result differs from single run by {diff}",
            inputs[i].0
        );
        assert_eq!(argmax(row), argmax(single));
    }
}

/// The fused CPU network against the same weights run one candle layer at a
/// time, with every kernel set this CPU can run, on a batch of three on two
/// threads: two images take a thread each and the third is split across both.
/// The answers must not depend on that split: every bit is the same on one
/// thread or two, in a batch or alone.
#[test]
fn fused_network_matches_layer_by_layer_with_every_kernel_set() {
    let pool = pool();
    let model = pool
        .install(|| EfficientNetLite0::load(&weights(), &Device::Cpu))
        .expect("load model");
    let mut flat = splitmix_input();
    for (name, _) in &PHOTOS[..2] {
        flat.extend(normalise(&golden_pixels(name)));
    }
    let x = Tensor::from_slice(&flat, (3, 3, 224, 224), &Device::Cpu).expect("input");
    let expected: Vec<f32> = pool
        .install(|| model.forward_layers(&x))
        .and_then(|y| y.flatten_all()?.to_vec1())
        .expect("layer by layer");
    if model.cpu_kernels().is_none() {
        eprintln!(
            "no AVX2 or AVX-512 on this CPU: the network runs layer by layer, nothing fused to compare"
        );
        return;
    }
    for isa in Isa::available() {
        let model = model.clone().with_cpu_kernels(isa);
        assert_eq!(model.cpu_kernels(), Some(isa));
        let mut runs = Vec::new();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let got = pool.install(|| logits(&model, &flat, 3));
            let diff = max_abs_diff(&got, &expected);
            println!("{}, {threads} threads: max abs diff {diff:.2e}", isa.name());
            assert!(
                diff <= BATCH_TOLERANCE,
                "{} kernels on {threads} threads differ from layer by layer by {diff}",
                isa.name()
            );
            runs.push(got);
            let alone = pool.install(|| logits(&model, &flat[2 * 3 * 224 * 224..], 1));
            assert_eq!(
                alone,
                runs[0][2000..],
                "{}: alone vs in a batch",
                isa.name()
            );
        }
        assert_eq!(runs[0], runs[1], "{}: one thread vs two", isa.name());
    }
}

/// bf16 on the CPU (operands of every product rounded to bf16, sums in f32)
/// against the same golden logits: the largest difference measured over the
/// golden photos (0.10 on an AMD EPYC Zen 4), with headroom. Far above f32's 1e-3, far below what would
/// move a confident top-1 class.
const BF16_TOLERANCE: f32 = 0.25;

/// `--dtype bf16` on the CPU: within [`BF16_TOLERANCE`] of the golden logits
/// with the same top-1 class on every golden photo where the CPU has
/// AVX512-BF16, and refused with a reason where it does not.
#[test]
fn bf16_on_the_cpu_is_close_or_refused() {
    let pool = pool();
    let loaded = pool.install(|| EfficientNetLite0::load_as(&weights(), &Device::Cpu, DType::BF16));
    if !Isa::has_bf16() {
        let err = loaded
            .expect_err("a CPU without bf16 must refuse it")
            .to_string();
        assert!(err.contains("needs AVX512-BF16"), "{err}");
        return;
    }
    let model = loaded.expect("bf16 model");
    assert!(model.cpu_bf16());
    for (name, class) in PHOTOS {
        let got = pool.install(|| logits(&model, &normalise(&golden_pixels(name)), 1));
        let diff = max_abs_diff(&got, &golden_logits(name));
        println!(
            "{name}: bf16 max abs diff to golden logits {diff:.3}, top-1 {}",
            argmax(&got)
        );
        assert!(diff < BF16_TOLERANCE, "{name}: bf16 differs by {diff}");
        assert_eq!(argmax(&got), class, "{name}: bf16 changed the top-1 class");
    }
}

#[test]
fn refuses_weights_of_another_shape() {
    let mut tensors = candle_core::safetensors::load(weights(), &Device::Cpu).expect("weights");
    let bad = Tensor::zeros((24, 16, 1, 1), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    tensors.insert("_blocks.1._expand_conv.weight".into(), bad);
    let err = EfficientNetLite0::from_tensors(tensors, &Device::Cpu)
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.contains("_blocks.1._expand_conv.weight") && err.contains("[96, 16, 1, 1]"),
        "{err}"
    );
}
