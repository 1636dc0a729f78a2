//! 1x1 convolution over NHWC activations: with channels last, every pixel of
//! the batch is a row, so the layer is one `[N*H*W, Cin] x [Cin, Cout]` GEMM
//! followed by an in-place bias/ReLU6/residual pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use super::epilogue::Epilogue;
use super::gemm_into_new;

/// A pointwise convolution with its (folded) bias.
#[derive(Debug, Clone)]
pub struct Pointwise {
    /// `[Cin, Cout]`, contiguous, so the GEMM reads it row by row.
    weight: Tensor,
    gemm: Gemm,
    epilogue: Epilogue,
}

impl Pointwise {
    /// Weight `[Cout, Cin, 1, 1]`, bias `[Cout]`; `relu6` clamps the output to [0, 6].
    pub fn new(weight: &Tensor, bias: &Tensor, relu6: bool) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (1, 1) {
            bail!("pointwise: weight shape {:?} is not 1x1", weight.dims());
        }
        let weight = weight
            .to_dtype(DType::F32)?
            .reshape((cout, cin))?
            .t()?
            .contiguous()?;
        let epilogue = Epilogue::new(bias, relu6)?;
        if epilogue.channels() != cout {
            bail!(
                "pointwise: bias has {} channels, expected {cout}",
                epilogue.channels()
            );
        }
        let gemm = Gemm::new(&weight)?;
        Ok(Self {
            weight,
            gemm,
            epilogue,
        })
    }

    /// The layer computing in `dtype` on devices other than the CPU (whose kernel stays f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            gemm: self.gemm.clone(),
            epilogue: self.epilogue.to_dtype(dtype)?,
        })
    }

    /// `[N, H, W, Cin]` in, `[N, H, W, Cout]` out; `residual` (shaped like
    /// the output) is added after the bias, as MBConv's skip connection.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (n, h, w, cin) = x.dims4()?;
        let cout = self.weight.dim(1)?;
        let rows = x.reshape((n * h * w, cin))?;
        let y = if rows.device().is_cpu() && rows.dtype() == DType::F32 {
            rows.contiguous()?.apply_op1_no_bwd(&self.gemm)?
        } else {
            rows.matmul(&self.weight)?
        };
        let residual = residual.map(|r| r.reshape((n * h * w, cout))).transpose()?;
        self.epilogue
            .apply(y, residual.as_ref())?
            .reshape((n, h, w, cout))
    }
}

/// `[M, K] x [K, N]` on the CPU with the weight held as a plain vector.
///
/// candle's matmul does the same GEMM but asks the OS for the CPU count on
/// every call (about 5 ms per batch-1 forward pass here) and zeroes its output
/// first; this writes the output once, on the caller's rayon pool.
#[derive(Debug, Clone)]
pub struct Gemm {
    /// `[K, N]` row-major.
    weight: Vec<f32>,
    k: usize,
    n: usize,
}

impl Gemm {
    /// From a contiguous `[K, N]` weight.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (k, n) = weight.dims2()?;
        let weight = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self { weight, k, n })
    }
}

impl CustomOp1 for Gemm {
    fn name(&self) -> &'static str {
        "gemm-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("gemm: f32 input only")
        };
        let (m, k) = layout.shape().dims2()?;
        if k != self.k {
            bail!("gemm: input has {k} columns, weight {} rows", self.k);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("gemm: input must be contiguous")
        };
        let out = gemm_into_new(&data[start..end], &self.weight, m, k, self.n);
        Ok((CpuStorage::F32(out), Shape::from((m, self.n))))
    }
}
