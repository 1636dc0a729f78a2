//! The depthwise convolution on CUDA: one thread per output element, consecutive threads on consecutive
//! channels, so the NHWC loads and stores of a warp are contiguous.
//!
//! candle runs a grouped convolution as one convolution per channel on CUDA too. The kernel is compiled from
//! source with NVRTC the first time it runs, so building with `--features cuda` needs no nvcc step of ours and
//! the PTX suits whatever GPU the driver finds. It computes in f32; half-precision models convert around it.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, bail};

use super::same_padding;

const MODULE: &str = "imageserve_depthwise";
const FUNCTION: &str = "depthwise_nhwc_f32";

/// CUDA C for NVRTC.
pub const SOURCE: &str = include_str!("depthwise.cu");

/// The PTX of [`SOURCE`], compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SOURCE)
            .map(|ptx| ptx.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| {
        candle_core::Error::Cuda(format!("compiling the depthwise kernel with NVRTC: {e}").into())
    })
}

fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| candle_core::Error::Msg(format!("depthwise: {what} {value} is too large")))
}

/// `[N, H, W, C]` x, `[C, 1, k, k]` weight and `[C]` bias, all f32 on one CUDA device, to `[N, Ho, Wo, C]`
/// with TensorFlow "same" padding.
#[derive(Debug, Clone, Copy)]
pub struct DepthwiseCuda {
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

impl CustomOp3 for DepthwiseCuda {
    fn name(&self) -> &'static str {
        "depthwise-nhwc-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("depthwise-nhwc-cuda runs on CUDA only; the CPU has its own kernel")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, h, wd, c) = x_layout.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        if w_layout.shape().dims() != [c, 1, k, k] || b_layout.shape().dims() != [c] {
            bail!(
                "depthwise: weight {:?} and bias {:?} do not fit {c} channels and a {k}x{k} kernel",
                w_layout.shape().dims(),
                b_layout.shape().dims()
            );
        }
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) = (
            x_layout.contiguous_offsets(),
            w_layout.contiguous_offsets(),
            b_layout.contiguous_offsets(),
        ) else {
            bail!("depthwise: input, weight and bias must be contiguous")
        };
        let dev = x.device();
        let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
        let ws = w.as_cuda_slice::<f32>()?.slice(w0..w1);
        let bs = b.as_cuda_slice::<f32>()?.slice(b0..b1);
        let (ho, wo) = (h.div_ceil(s), wd.div_ceil(s));
        let (top, left) = (same_padding(h, k, s).0, same_padding(wd, k, s).0);
        let len = n * ho * wo * c;
        let Ok(threads) = u32::try_from(len) else {
            bail!("depthwise: {len} outputs are more than one launch covers")
        };
        // SAFETY: the kernel writes every one of the `len` elements before anything reads them.
        let out = unsafe { dev.alloc::<f32>(len)? };
        if len > 0 {
            let func = dev.get_or_load_custom_func(FUNCTION, MODULE, ptx()?)?;
            let args = [
                int(n, "batch")?,
                int(h, "height")?,
                int(wd, "width")?,
                int(c, "channels")?,
                int(ho, "output height")?,
                int(wo, "output width")?,
                int(k, "kernel")?,
                int(s, "stride")?,
                int(top, "padding")?,
                int(left, "padding")?,
                i32::from(self.relu6),
            ];
            let mut builder = func.builder();
            builder.arg(&xs);
            builder.arg(&ws);
            builder.arg(&bs);
            builder.arg(&out);
            for arg in &args {
                builder.arg(arg);
            }
            // SAFETY: the argument list matches the kernel's signature, and every index it computes stays
            // inside the buffers checked above.
            unsafe { builder.launch(LaunchConfig::for_num_elems(threads)) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, ho, wo, c)),
        ))
    }
}
