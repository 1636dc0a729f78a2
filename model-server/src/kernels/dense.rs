//! A full (dense) convolution from NCHW input to NHWC output with TensorFlow
//! "same" padding, as one im2col pass and one GEMM: the network's stem.
//!
//! candle's conv2d produces NCHW, which the rest of the network would then
//! have to transpose; writing the patches pixel by pixel lets the GEMM emit
//! channels-last rows directly.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{gemm_into_new, same_padding};

/// Convolution weights laid out for the GEMM.
#[derive(Debug, Clone)]
pub struct Dense {
    /// `[Cin * k * k, Cout]`: row `(ci, ky, kx)` holds every output channel.
    weight: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
}

impl Dense {
    /// Weight `[Cout, Cin, k, k]`.
    pub fn new(weight: &Tensor, stride: usize) -> Result<Self> {
        let (cout, cin, kernel, kw) = weight.dims4()?;
        if kernel != kw || kernel == 0 || stride == 0 {
            bail!(
                "dense: unsupported weight shape {:?} with stride {stride}",
                weight.dims()
            );
        }
        let weight = weight
            .to_dtype(DType::F32)?
            .reshape((cout, cin * kernel * kernel))?
            .t()?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self {
            weight,
            cin,
            cout,
            kernel,
            stride,
        })
    }

    /// The patches of contiguous NCHW `x`: `[N * Ho * Wo, Cin * k * k]`.
    fn im2col(&self, x: &[f32], (n, h, w): (usize, usize, usize)) -> (Vec<f32>, usize, usize) {
        let (k, s) = (self.kernel, self.stride);
        let (ho, wo) = (h.div_ceil(s), w.div_ceil(s));
        let (top, left) = (same_padding(h, k, s).0, same_padding(w, k, s).0);
        let patch = self.cin * k * k;
        let mut cols = vec![0f32; n * ho * wo * patch];
        if cols.is_empty() {
            return (cols, ho, wo);
        }
        cols.par_chunks_mut(wo * patch)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (img, oy) = (r / ho, r % ho);
                let image = &x[img * self.cin * h * w..(img + 1) * self.cin * h * w];
                for (ox, p) in out_row.chunks_exact_mut(patch).enumerate() {
                    for ci in 0..self.cin {
                        let plane = &image[ci * h * w..(ci + 1) * h * w];
                        for ky in 0..k {
                            // Padding rows and columns stay zero.
                            let Some(iy) = (oy * s + ky).checked_sub(top).filter(|&y| y < h) else {
                                continue;
                            };
                            for kx in 0..k {
                                if let Some(ix) = (ox * s + kx).checked_sub(left).filter(|&x| x < w)
                                {
                                    p[(ci * k + ky) * k + kx] = plane[iy * w + ix];
                                }
                            }
                        }
                    }
                }
            });
        (cols, ho, wo)
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "dense-conv2d-nchw-to-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("dense: f32 input only")
        };
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.cin {
            bail!("dense: input has {c} channels, weights {}", self.cin);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("dense: input must be contiguous NCHW")
        };
        let (cols, ho, wo) = self.im2col(&data[start..end], (n, h, w));
        let patch = self.cin * self.kernel * self.kernel;
        let out = if cols.is_empty() {
            Vec::new()
        } else {
            gemm_into_new(&cols, &self.weight, n * ho * wo, patch, self.cout)
        };
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, self.cout))))
    }
}
