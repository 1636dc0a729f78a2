//! 1x1 convolution over NHWC activations: with channels last, every pixel of
//! the batch is a row, so the layer is one `[N*H*W, Cin] x [Cin, Cout]` GEMM
//! on candle's matmul followed by an in-place bias/ReLU6/residual pass.

use candle_core::{DType, Result, Tensor, bail};

use super::epilogue::Epilogue;

/// A pointwise convolution with its (folded) bias.
#[derive(Debug, Clone)]
pub struct Pointwise {
    /// `[Cin, Cout]`, contiguous, so the GEMM reads it row by row.
    weight: Tensor,
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
        Ok(Self { weight, epilogue })
    }

    /// `[N, H, W, Cin]` in, `[N, H, W, Cout]` out; `residual` (shaped like
    /// the output) is added after the bias, as MBConv's skip connection.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (n, h, w, cin) = x.dims4()?;
        let cout = self.weight.dim(1)?;
        let y = x.reshape((n * h * w, cin))?.matmul(&self.weight)?;
        let residual = residual.map(|r| r.reshape((n * h * w, cout))).transpose()?;
        self.epilogue
            .apply(y, residual.as_ref())?
            .reshape((n, h, w, cout))
    }
}
