//! The custom CPU kernels against candle's own (slow but plain) operations:
//! depthwise against `conv2d` with groups = channels, pointwise against a
//! 1x1 `conv2d`, the dense stem convolution against `conv2d` and a transpose, over random shapes, strides, kernel sizes, TF-"same"
//! paddings of odd and even sizes, and batch sizes; the Winograd 3x3 convolution against a padded `conv2d`
//! on every instruction set the CPU has.

use candle_core::{Device, Result, Tensor};
use model_server::kernels::dense::Dense;
use model_server::kernels::depthwise::Depthwise;
use model_server::kernels::isa::Isa;
use model_server::kernels::pointwise::Pointwise;
use model_server::kernels::winograd::Winograd3x3;

/// Both sides compute in f32 but sum in different orders (and the kernel may
/// use fused multiply-add): a few 1e-6 apart on these magnitudes.
const TOLERANCE: f32 = 1e-4;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

/// TensorFlow's "same" padding, written from its documentation rather than
/// taken from the crate: output ceil(n / s), the odd pixel padded after.
fn tf_same(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

fn relu6(y: Tensor, on: bool) -> Result<Tensor> {
    if on { y.clamp(0f32, 6f32) } else { Ok(y) }
}

/// candle's grouped convolution on NCHW, on NHWC tensors.
fn reference_depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    act: bool,
) -> Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let k = weight.dim(2)?;
    let (top, bottom) = tf_same(h, k, stride);
    let (left, right) = tf_same(w, k, stride);
    let y = x
        .permute((0, 3, 1, 2))?
        .pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)?
        .conv2d(weight, 0, stride, 1, c)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    relu6(y, act)?.permute((0, 2, 3, 1))?.contiguous()
}

/// candle's 1x1 convolution on NCHW, on NHWC tensors.
fn reference_pointwise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    act: bool,
) -> Result<Tensor> {
    let cout = weight.dim(0)?;
    let mut y = x
        .permute((0, 3, 1, 2))?
        .conv2d(weight, 0, 1, 1, 1)?
        .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?
        .permute((0, 2, 3, 1))?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    relu6(y, act)?.contiguous()
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).expect("random tensor")
}

/// Spatial sizes: even and odd, square and not, and one smaller than the
/// 5x5 kernel so that padding covers most taps.
const SIZES: [(usize, usize); 4] = [(8, 8), (7, 9), (14, 15), (3, 2)];
/// Channel counts that hit the 32-wide, 8-wide and single-channel paths.
const CHANNELS: [usize; 4] = [5, 8, 32, 75];

#[test]
fn depthwise_matches_grouped_conv2d() {
    let mut cases = 0;
    for kernel in [3, 5] {
        for stride in [1, 2] {
            for (i, batch) in [1, 3, 8].into_iter().enumerate() {
                for (j, &(h, w)) in SIZES.iter().enumerate() {
                    // Not the full product: every size and channel count
                    // meets every kernel, stride and batch size somewhere.
                    let c = CHANNELS[(i + j + kernel + stride) % CHANNELS.len()];
                    let act = (i + j) % 2 == 0;
                    let x = randn(&[batch, h, w, c]);
                    let weight = randn(&[c, 1, kernel, kernel]);
                    // Larger bias so ReLU6 clamps at both ends.
                    let bias = (randn(&[c]) * 3.0).expect("bias");
                    let op = Depthwise::new(&weight, &bias, stride, act).expect("op");
                    let got = op.forward(&x).expect("depthwise");
                    assert_eq!(
                        got.dims(),
                        [batch, h.div_ceil(stride), w.div_ceil(stride), c],
                        "output shape"
                    );
                    let want =
                        reference_depthwise(&x, &weight, &bias, stride, act).expect("reference");
                    let diff = max_abs_diff(&got, &want);
                    assert!(
                        diff <= TOLERANCE,
                        "k{kernel} s{stride} n{batch} {h}x{w}x{c} relu6={act}: max abs diff {diff}"
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 48);
}

#[test]
fn depthwise_accepts_non_contiguous_input() {
    let x = randn(&[2, 6, 5, 3]);
    let x_nhwc = x.permute((0, 2, 3, 1)).expect("permute"); // [2, 5, 3, 6], strided
    let weight = randn(&[6, 1, 3, 3]);
    let bias = randn(&[6]);
    let op = Depthwise::new(&weight, &bias, 2, false).expect("op");
    let got = op.forward(&x_nhwc).expect("depthwise");
    let want = reference_depthwise(&x_nhwc, &weight, &bias, 2, false).expect("reference");
    assert!(max_abs_diff(&got, &want) <= TOLERANCE);
}

#[test]
fn depthwise_gives_identical_results_on_any_number_of_threads() {
    let x = randn(&[3, 15, 14, 40]);
    let op = Depthwise::new(&randn(&[40, 1, 5, 5]), &randn(&[40]), 2, true).expect("op");
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| op.forward(&x))
            .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
            .expect("depthwise")
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn depthwise_refuses_mismatched_channels() {
    let op = Depthwise::new(&randn(&[8, 1, 3, 3]), &randn(&[8]), 1, true).expect("op");
    let err = op.forward(&randn(&[1, 4, 4, 7])).expect_err("must refuse");
    assert!(err.to_string().contains("7 channels"), "{err}");
}

#[test]
fn pointwise_matches_1x1_conv2d() {
    for (i, batch) in [1, 3, 8].into_iter().enumerate() {
        for (j, &(h, w)) in SIZES.iter().enumerate() {
            let cin = CHANNELS[(i + j) % CHANNELS.len()] + 3;
            let cout = CHANNELS[(i + 2 * j + 1) % CHANNELS.len()];
            let x = randn(&[batch, h, w, cin]);
            let weight = randn(&[cout, cin, 1, 1]);
            let bias = (randn(&[cout]) * 3.0).expect("bias");
            let residual = randn(&[batch, h, w, cout]);
            for (act, res) in [(true, None), (false, None), (false, Some(&residual))] {
                let op = Pointwise::new(&weight, &bias, act).expect("op");
                let got = op.forward(&x, res).expect("pointwise");
                let want = reference_pointwise(&x, &weight, &bias, res, act).expect("reference");
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= TOLERANCE,
                    "n{batch} {h}x{w} {cin}->{cout} relu6={act} residual={}: max abs diff {diff}",
                    res.is_some()
                );
            }
        }
    }
}

#[test]
fn pointwise_matches_matmul() {
    let x = randn(&[3, 7, 9, 24]);
    let weight = randn(&[40, 24, 1, 1]);
    let bias = randn(&[40]);
    let got = Pointwise::new(&weight, &bias, false)
        .and_then(|op| op.forward(&x, None))
        .expect("pointwise");
    let want = x
        .reshape((3 * 7 * 9, 24))
        .and_then(|x| x.matmul(&weight.reshape((40, 24))?.t()?))
        .and_then(|y| y.broadcast_add(&bias)?.reshape((3, 7, 9, 40)))
        .expect("matmul");
    assert!(max_abs_diff(&got, &want) <= TOLERANCE);
}

#[test]
fn pointwise_leaves_its_residual_untouched() {
    let x = randn(&[1, 4, 4, 8]);
    let residual = randn(&[1, 4, 4, 8]);
    let before = residual
        .flatten_all()
        .and_then(|r| r.to_vec1::<f32>())
        .expect("vec");
    Pointwise::new(&randn(&[8, 8, 1, 1]), &randn(&[8]), true)
        .and_then(|op| op.forward(&x, Some(&residual)))
        .expect("pointwise");
    let after = residual
        .flatten_all()
        .and_then(|r| r.to_vec1::<f32>())
        .expect("vec");
    assert_eq!(before, after);
}

#[test]
fn dense_matches_conv2d_then_nhwc() {
    for (i, batch) in [1, 3].into_iter().enumerate() {
        for (j, &(h, w)) in SIZES.iter().enumerate() {
            for (kernel, stride) in [(3, 2), (3, 1), (5, 2)] {
                let cin = [3, 1, 4][(i + j) % 3];
                let cout = CHANNELS[(i + j) % CHANNELS.len()];
                let x = randn(&[batch, cin, h, w]);
                let weight = randn(&[cout, cin, kernel, kernel]);
                let got = Dense::new(&weight, stride)
                    .and_then(|op| x.apply_op1_no_bwd(&op))
                    .expect("dense");
                let (top, bottom) = tf_same(h, kernel, stride);
                let (left, right) = tf_same(w, kernel, stride);
                let want = x
                    .pad_with_zeros(2, top, bottom)
                    .and_then(|x| x.pad_with_zeros(3, left, right))
                    .and_then(|x| x.conv2d(&weight, 0, stride, 1, 1))
                    .and_then(|y| y.permute((0, 2, 3, 1)))
                    .expect("reference");
                assert_eq!(
                    got.dims(),
                    want.dims(),
                    "n{batch} {h}x{w} k{kernel} s{stride}"
                );
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= TOLERANCE,
                    "n{batch} {h}x{w} {cin}->{cout} k{kernel} s{stride}: max abs diff {diff}"
                );
            }
        }
    }
}

#[test]
fn dense_refuses_mismatched_channels() {
    let op = Dense::new(&randn(&[8, 3, 3, 3]), 2).expect("op");
    let err = randn(&[1, 4, 8, 8])
        .apply_op1_no_bwd(&op)
        .expect_err("4 channels into a 3-channel convolution");
    assert!(err.to_string().contains("channels"), "{err}");
}

#[test]
fn winograd_matches_a_padded_conv2d_on_every_instruction_set() {
    // Odd sizes leave half tiles at the bottom and right; 1x1 and 2x3 are mostly padding; channel counts
    // off the 16-lane and 16-column multiples take the tails; batch 3 puts several images in one band.
    let cases = [
        (1, 13, 13, 32, 48, true),
        (3, 7, 9, 5, 7, false),
        (2, 26, 26, 17, 33, true),
        (1, 1, 1, 16, 16, true),
        (2, 2, 3, 40, 300, false),
        (1, 52, 30, 64, 130, true),
    ];
    for isa in Isa::available() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            for (n, h, w, cin, cout, leaky) in cases {
                let x = randn(&[n, h, w, cin]);
                let weight = randn(&[cout, cin, 3, 3]);
                let bias = randn(&[cout]);
                let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                let op = Winograd3x3::new(
                    &values(&weight).expect("weights"),
                    &values(&bias).expect("bias"),
                    cin,
                    cout,
                    leaky.then_some(0.1),
                );
                let got = pool.install(|| op.run(isa, &values(&x).expect("input"), n, h, w));
                let got = Tensor::from_vec(got, (n, h, w, cout), &Device::Cpu).expect("output");
                let mut want = x
                    .permute((0, 3, 1, 2))
                    .and_then(|x| x.conv2d(&weight, 1, 1, 1, 1))
                    .and_then(|y| y.broadcast_add(&bias.reshape((1, cout, 1, 1))?))
                    .and_then(|y| y.permute((0, 2, 3, 1)))
                    .expect("reference");
                if leaky {
                    want = want.maximum(&(&want * 0.1).expect("slope")).expect("leaky");
                }
                // The transforms scale the kernel by 1/2 and 1/4 and sum up to 16 inputs: still f32 rounding,
                // a little more of it than a direct sum over 9 * cin products.
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-3,
                    "{isa:?}, {threads} threads, n{n} {h}x{w} {cin}->{cout}: max abs diff {diff}"
                );
            }
        }
    }
}
