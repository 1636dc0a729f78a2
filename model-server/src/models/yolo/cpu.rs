//! The network on the CPU in f32, channels-last: each convolution is an im2col over a band of output rows and
//! one packed GEMM with the bias, then the leaky ReLU in the same band while it is in cache. candle's generic
//! conv2d builds NCHW patches for the whole image and transposes between layers; this does neither. The 3x3
//! stride-1 convolutions, 96% of the network's multiplies, go through Winograd's algorithm instead.

use candle_core::{Result, Tensor, bail};
use rayon::prelude::*;

use crate::convert::darknet::{Activation, Layer, Network};
use crate::kernels::isa::Isa;
use crate::kernels::packed_gemm::{Epilogue, PackedB, gemm};
use crate::kernels::winograd::Winograd3x3;

/// Output pixels a task of a convolution computes at least, so the GEMM gets rows enough to block well.
const PIXELS_PER_TASK: usize = 128;

/// A feature map, `[n, h, w, c]` row-major.
struct Map {
    data: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// Input channels from which a 3x3 stride-1 convolution goes through Winograd's F(2x2, 3x3): below them the
/// GEMMs' depth (the channels) is too shallow to pay for the transforms.
const WINOGRAD_MIN_CHANNELS: usize = 16;

/// A convolution packed for the CPU: Winograd's algorithm where it applies, im2col and one GEMM elsewhere.
pub(super) enum Conv {
    Winograd(Winograd3x3),
    Im2col(Im2col),
}

impl Conv {
    /// From an OIHW kernel `[cout, cin, size, size]` and its bias, batch norm already folded in.
    pub(super) fn new(
        kernel: &[f32],
        bias: &[f32],
        shape: [usize; 4],
        stride: usize,
        padding: usize,
        activation: Activation,
    ) -> Self {
        let [cout, cin, size, _] = shape;
        if size == 3 && stride == 1 && padding == 1 && cin >= WINOGRAD_MIN_CHANNELS {
            let leaky = (activation == Activation::Leaky).then_some(0.1);
            return Self::Winograd(Winograd3x3::new(kernel, bias, cin, cout, leaky));
        }
        // The GEMM's rows are ordered (ky, kx, ci), as the patches are.
        let mut weight = vec![0f32; size * size * cin * cout];
        for o in 0..cout {
            for c in 0..cin {
                for y in 0..size {
                    for x in 0..size {
                        weight[((y * size + x) * cin + c) * cout + o] =
                            kernel[((o * cin + c) * size + y) * size + x];
                    }
                }
            }
        }
        Self::Im2col(Im2col {
            packed: PackedB::new(&weight, bias, size * size * cin, cout),
            size,
            stride,
            padding,
            leaky: activation == Activation::Leaky,
            cin,
        })
    }

    fn run(&self, isa: Isa, x: &Map) -> Result<Map> {
        let cin = match self {
            Self::Im2col(conv) => conv.cin,
            Self::Winograd(conv) => conv.cin(),
        };
        if x.c != cin {
            bail!("yolo: a convolution of {cin} input channels got {}", x.c);
        }
        match self {
            Self::Im2col(conv) => conv.run(isa, x),
            Self::Winograd(conv) => Ok(Map {
                data: conv.run(isa, &x.data, x.n, x.h, x.w),
                c: conv.cout(),
                ..*x
            }),
        }
    }
}

/// A convolution with its weights packed for the GEMM, rows ordered (ky, kx, ci) as the patches are.
pub(super) struct Im2col {
    packed: PackedB,
    size: usize,
    stride: usize,
    padding: usize,
    leaky: bool,
    cin: usize,
}

impl Im2col {
    /// `x`'s channels already checked by [`Conv::run`].
    fn run(&self, isa: Isa, x: &Map) -> Result<Map> {
        let (k, s, p) = (self.size, self.stride, self.padding);
        if x.h + 2 * p < k || x.w + 2 * p < k {
            bail!("yolo: a {k}x{k} convolution on a {}x{} map", x.h, x.w);
        }
        let (ho, wo) = ((x.h + 2 * p - k) / s + 1, (x.w + 2 * p - k) / s + 1);
        let cout = self.packed.n();
        let kdim = self.packed.k();
        let mut out = vec![0f32; x.n * ho * wo * cout];
        let rows = x.n * ho;
        let band = PIXELS_PER_TASK
            .div_ceil(wo)
            .clamp(1, rows.div_ceil(2 * rayon::current_num_threads()).max(1));
        let direct = k == 1 && s == 1 && p == 0;
        out.par_chunks_mut(band * wo * cout)
            .enumerate()
            .for_each_init(Vec::new, |cols: &mut Vec<f32>, (i, out)| {
                let first = i * band;
                let pixels = out.len() / cout;
                let (a, lda) = if direct {
                    // A 1x1 convolution's patches are the input's pixels themselves.
                    let start = first * wo * x.c;
                    (&x.data[start..start + pixels * x.c], x.c)
                } else {
                    // Every value of every patch is written below, padding included, so the buffer is not
                    // cleared between tasks.
                    cols.resize(pixels * kdim, 0.0);
                    let mut patches = cols.chunks_exact_mut(kdim);
                    for row in first..first + pixels / wo {
                        let (img, oy) = (row / ho, row % ho);
                        let image = &x.data[img * x.h * x.w * x.c..(img + 1) * x.h * x.w * x.c];
                        for (ox, patch) in (0..wo).zip(patches.by_ref()) {
                            // The taps' columns inside the map, `x0..x1`, are adjacent pixels: one copy a row.
                            let left = (ox * s) as isize - p as isize;
                            let x0 = left.max(0) as usize;
                            let x1 =
                                ((left + k as isize).min(x.w as isize)).max(x0 as isize) as usize;
                            let skip = ((x0 as isize - left) as usize).min(k);
                            for (ky, taps) in patch.chunks_exact_mut(k * x.c).enumerate() {
                                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < x.h)
                                else {
                                    taps.fill(0.0);
                                    continue;
                                };
                                let inside = (x1 - x0) * x.c;
                                let src = (iy * x.w + x0) * x.c;
                                taps[..skip * x.c].fill(0.0);
                                taps[skip * x.c..skip * x.c + inside]
                                    .copy_from_slice(&image[src..src + inside]);
                                taps[skip * x.c + inside..].fill(0.0);
                            }
                        }
                    }
                    (&cols[..], kdim)
                };
                gemm(
                    isa,
                    a,
                    lda,
                    pixels,
                    &self.packed,
                    0..kdim,
                    0..self.packed.panels(),
                    out,
                    cout,
                    Epilogue::LINEAR,
                );
                if self.leaky {
                    // max(v, 0.1 v) is the leaky ReLU without a branch, so it vectorises.
                    for v in out.iter_mut() {
                        *v = v.max(0.1 * *v);
                    }
                }
            });
        Ok(Map {
            data: out,
            n: x.n,
            h: ho,
            w: wo,
            c: cout,
        })
    }
}

/// darknet's max pool (see `super::max_pool`), skipping the cells outside the map.
fn max_pool(x: &Map, size: usize, stride: usize) -> Map {
    let before = (size - 1) / 2;
    let (ho, wo) = ((x.h - 1) / stride + 1, (x.w - 1) / stride + 1);
    let c = x.c;
    let mut out = vec![f32::NEG_INFINITY; x.n * ho * wo * c];
    out.par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(row, out)| {
            let (img, oy) = (row / ho, row % ho);
            for ox in 0..wo {
                let dst = &mut out[ox * c..(ox + 1) * c];
                for ky in 0..size {
                    let Some(iy) = (oy * stride + ky).checked_sub(before).filter(|&y| y < x.h)
                    else {
                        continue;
                    };
                    for kx in 0..size {
                        if let Some(ix) =
                            (ox * stride + kx).checked_sub(before).filter(|&v| v < x.w)
                        {
                            let src = ((img * x.h + iy) * x.w + ix) * c;
                            for (d, s) in dst.iter_mut().zip(&x.data[src..src + c]) {
                                *d = d.max(*s);
                            }
                        }
                    }
                }
            }
        });
    Map {
        data: out,
        n: x.n,
        h: ho,
        w: wo,
        c,
    }
}

fn upsample(x: &Map, stride: usize) -> Map {
    let (ho, wo, c) = (x.h * stride, x.w * stride, x.c);
    let mut out = vec![0f32; x.n * ho * wo * c];
    out.par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(row, out)| {
            let (img, oy) = (row / ho, row % ho);
            for ox in 0..wo {
                let src = ((img * x.h + oy / stride) * x.w + ox / stride) * c;
                out[ox * c..(ox + 1) * c].copy_from_slice(&x.data[src..src + c]);
            }
        });
    Map {
        data: out,
        n: x.n,
        h: ho,
        w: wo,
        c,
    }
}

/// The channels of `parts` side by side, pixel by pixel.
fn route(parts: &[&Map]) -> Result<Map> {
    let first = parts[0];
    if parts
        .iter()
        .any(|m| (m.n, m.h, m.w) != (first.n, first.h, first.w))
    {
        bail!("yolo: a route joins maps of different sizes");
    }
    let c: usize = parts.iter().map(|m| m.c).sum();
    let mut out = vec![0f32; first.n * first.h * first.w * c];
    out.par_chunks_mut(c).enumerate().for_each(|(pixel, out)| {
        let mut at = 0;
        for m in parts {
            out[at..at + m.c].copy_from_slice(&m.data[pixel * m.c..(pixel + 1) * m.c]);
            at += m.c;
        }
    });
    Ok(Map {
        data: out,
        n: first.n,
        h: first.h,
        w: first.w,
        c,
    })
}

/// Runs `network` on NCHW f32 `x` with the packed convolutions `convs` (one per layer, `None` for the
/// others); returns what each `[yolo]` head receives, NCHW.
pub(super) fn forward(
    isa: Isa,
    network: &Network,
    convs: &[Option<Conv>],
    x: &Tensor,
) -> Result<Vec<Tensor>> {
    let (n, c, h, w) = x.dims4()?;
    let input = Map {
        data: x
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?,
        n,
        h,
        w,
        c,
    };
    let mut outputs: Vec<Map> = Vec::with_capacity(network.layers.len());
    let mut heads = Vec::new();
    for (i, layer) in network.layers.iter().enumerate() {
        let x = outputs.last().unwrap_or(&input);
        let y = match layer {
            Layer::Convolutional { .. } => {
                let Some(conv) = &convs[i] else {
                    bail!("yolo: no weights for convolutional layer {i}");
                };
                conv.run(isa, x)?
            }
            Layer::MaxPool { size, stride } => max_pool(x, *size, *stride),
            Layer::Upsample { stride } => upsample(x, *stride),
            Layer::Route { layers } => {
                route(&layers.iter().map(|&l| &outputs[l]).collect::<Vec<_>>())?
            }
            Layer::Yolo(_) => {
                heads.push(
                    Tensor::from_slice(&x.data, (x.n, x.h, x.w, x.c), &candle_core::Device::Cpu)?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?,
                );
                Map {
                    data: x.data.clone(),
                    ..*x
                }
            }
        };
        outputs.push(y);
    }
    Ok(heads)
}
