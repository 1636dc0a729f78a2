//! The model on an NVIDIA GPU (`--features cuda`, run by scripts/gpu-check.sh on a machine with one): the
//! depthwise CUDA kernel against the CPU kernel over random shapes, f32 logits against the golden ones, and
//! f16/bf16 against the golden top-1 classes with their distance reported; the detector's boxes against the CPU's.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::*;
use model_server::kernels::depthwise::Depthwise;
use model_server::models::efficientnet::EfficientNetLite0;

/// The same bound as on the CPU: f32 on the GPU sums in another order, and cuBLAS may use TF32 if allowed.
const TOLERANCE: f32 = 1e-3;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA GPU (this test runs only on one)")
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut z = seed;
    (0..len)
        .map(|_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((x >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn depthwise_kernel_matches_the_cpu_kernel() {
    let pool = pool();
    let gpu = gpu();
    let mut seed = 1;
    for (n, h, w, c, k, stride, relu6) in [
        (1, 112, 112, 32, 3, 1, true),
        (2, 112, 112, 96, 3, 2, true),
        (1, 57, 57, 144, 5, 2, false),
        (3, 14, 15, 480, 5, 1, true),
        (1, 7, 7, 1152, 3, 1, false),
        (1, 1, 1, 8, 3, 2, true),
    ] {
        seed += 1;
        let weight = Tensor::from_vec(values(c * k * k, seed), (c, 1, k, k), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(values(c, seed + 100), c, &Device::Cpu).unwrap();
        let x = Tensor::from_vec(
            values(n * h * w * c, seed + 200),
            (n, h, w, c),
            &Device::Cpu,
        )
        .unwrap();
        let cpu = Depthwise::new(&weight, &bias, stride, relu6).unwrap();
        let expected = pool.install(|| cpu.forward(&x)).unwrap();
        let on_gpu = Depthwise::new(
            &weight.to_device(&gpu).unwrap(),
            &bias.to_device(&gpu).unwrap(),
            stride,
            relu6,
        )
        .unwrap();
        let got = on_gpu
            .forward(&x.to_device(&gpu).unwrap())
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        assert_eq!(got.dims(), expected.dims());
        let diff = max_abs_diff(
            &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        println!("depthwise n={n} {h}x{w}x{c} k={k} s={stride}: max abs diff {diff:.2e}");
        assert!(diff < 1e-4, "{n}x{h}x{w}x{c} k={k} s={stride}: {diff}");
    }
}

fn gpu_logits(model: &EfficientNetLite0, input: &[f32]) -> Vec<f32> {
    let x = Tensor::from_slice(input, (1, 3, 224, 224), model.device()).unwrap();
    model
        .forward(&x)
        .and_then(|y| y.flatten_all()?.to_vec1())
        .unwrap()
}

#[test]
fn f32_matches_the_golden_logits_and_half_precision_keeps_the_top_1() {
    let gpu = gpu();
    let mut inputs = vec![("synthetic_splitmix0", splitmix_input())];
    for (name, _) in PHOTOS {
        inputs.push((name, normalise(&golden_pixels(name))));
    }
    let f32_model = EfficientNetLite0::load_as(&weights(), &gpu, DType::F32).unwrap();
    for (name, input) in &inputs {
        let diff = max_abs_diff(&gpu_logits(&f32_model, input), &golden_logits(name));
        println!("f32 {name}: max abs diff to golden logits {diff:.2e}");
        assert!(diff < TOLERANCE, "f32 {name}: {diff}");
    }
    for dtype in [DType::F16, DType::BF16] {
        let model = EfficientNetLite0::load_as(&weights(), &gpu, dtype).unwrap();
        for (name, expected) in PHOTOS {
            let got = gpu_logits(&model, &normalise(&golden_pixels(name)));
            let diff = max_abs_diff(&got, &golden_logits(name));
            println!(
                "{dtype:?} {name}: top-1 {} (golden {expected}), max abs diff to golden logits {diff:.3}",
                argmax(&got)
            );
            assert_eq!(
                argmax(&got),
                expected,
                "{dtype:?} {name}: top-1 differs from the golden one"
            );
        }
    }
}

/// The converted detector of the model repository, on `device`.
fn detector_on(device: &Device) -> Box<dyn model_server::backend::Model> {
    let dir = detector_repository().join("yolov3-tiny/1");
    let config = model_server::repository::read_config(&dir).expect("config.json");
    model_server::backend::load(&config, &dir, device, DType::F32).expect("load the detector")
}

#[test]
fn the_detector_on_the_gpu_finds_the_boxes_the_cpu_finds() {
    use model_server::backend::Outputs;
    use model_server::detections::{Selection, iou};

    let photos = ["camera", "coffee", "motorcycle_left", "clock_motion"];
    let inputs: Vec<Tensor> = photos
        .iter()
        .map(|photo| {
            let path = workspace().join(format!("testdata/yolo/{photo}.letterbox.npy"));
            let pixels = Tensor::read_npy(path).expect("letterbox");
            (pixels.to_dtype(DType::F32).expect("f32") / 255.0)
                .and_then(|t| t.permute((2, 0, 1))?.unsqueeze(0))
                .expect("input")
        })
        .collect();
    let x = Tensor::cat(&inputs, 0).expect("batch");
    let selections = [Selection::default(); 4];
    let run = |device: &Device| match detector_on(device).run(&x, &selections) {
        Ok(Outputs::Detections(found)) => found,
        other => panic!("the detector answered {other:?}"),
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&gpu()));
    for ((photo, c), g) in photos.iter().zip(&cpu).zip(&gpu) {
        assert_eq!(c.len(), g.len(), "{photo}: {c:?} vs {g:?}");
        for (a, b) in c.iter().zip(g) {
            assert_eq!(a.class, b.class, "{photo}");
            assert!(
                (a.score - b.score).abs() <= TOLERANCE,
                "{photo}: {a:?} vs {b:?}"
            );
            assert!(iou(&a.bbox, &b.bbox) >= 0.99, "{photo}: {a:?} vs {b:?}");
        }
        println!("{photo}: {} boxes, the same on the GPU", g.len());
    }
}
