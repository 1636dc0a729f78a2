//! EfficientNet-Lite0 (ImageNet-1k) on candle, from weights in the
//! `efficientnet_pytorch` key layout.
//!
//! Lite differs from B0: ReLU6 instead of swish, no squeeze-excite, fixed stem
//! and head. The checkpoint was converted from TensorFlow, so BatchNorm uses
//! eps 1e-3 and convolutions use TensorFlow "same" padding, which is asymmetric
//! for stride 2; both change logits by more than 1 if done the PyTorch way.

use std::collections::HashMap;

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::kernels::dense::Dense;
use crate::kernels::depthwise::Depthwise;
use crate::kernels::epilogue::Epilogue;
use crate::kernels::isa::Isa;
use crate::kernels::pointwise::Pointwise;
use crate::kernels::same_padding;

mod fused;

/// BatchNorm epsilon of the TensorFlow checkpoint.
const BN_EPS: f64 = 1e-3;

/// Input side length the network was trained at.
pub const INPUT_SIZE: usize = 224;

/// Number of ImageNet classes.
pub const NUM_CLASSES: usize = 1000;

/// One MBConv block of the B0/Lite0 table.
#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    kernel: usize,
    stride: usize,
    expand: usize,
    cin: usize,
    cout: usize,
}

const fn b(kernel: usize, stride: usize, expand: usize, cin: usize, cout: usize) -> BlockSpec {
    BlockSpec {
        kernel,
        stride,
        expand,
        cin,
        cout,
    }
}

/// The 16 blocks of EfficientNet-B0 (Lite0 keeps the same table).
const BLOCKS: [BlockSpec; 16] = [
    b(3, 1, 1, 32, 16),
    b(3, 2, 6, 16, 24),
    b(3, 1, 6, 24, 24),
    b(5, 2, 6, 24, 40),
    b(5, 1, 6, 40, 40),
    b(3, 2, 6, 40, 80),
    b(3, 1, 6, 80, 80),
    b(3, 1, 6, 80, 80),
    b(5, 1, 6, 80, 112),
    b(5, 1, 6, 112, 112),
    b(5, 1, 6, 112, 112),
    b(5, 2, 6, 112, 192),
    b(5, 1, 6, 192, 192),
    b(5, 1, 6, 192, 192),
    b(5, 1, 6, 192, 192),
    b(3, 1, 6, 192, 320),
];

const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;

/// Weights by name, consumed as the network is built so that a missing or
/// misshapen tensor is reported by its checkpoint name.
struct Weights {
    tensors: HashMap<String, Tensor>,
    device: Device,
}

impl Weights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("weight `{name}` is missing")))?;
        if t.dims() != shape {
            candle_core::bail!(
                "weight `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            );
        }
        t.to_dtype(DType::F32)?.to_device(&self.device)
    }
}

/// Loads a convolution and folds its BatchNorm into it, so inference is one
/// convolution plus a bias instead of five passes over the activations.
/// Returns the weight `[cout, cin_per_group, k, k]` and the bias `[cout]`.
fn load_conv_bn(
    w: &mut Weights,
    conv: &str,
    bn: &str,
    (cout, cin_per_group, kernel): (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let weight = w.get(
        &format!("{conv}.weight"),
        &[cout, cin_per_group, kernel, kernel],
    )?;
    let gamma = w.get(&format!("{bn}.weight"), &[cout])?;
    let beta = w.get(&format!("{bn}.bias"), &[cout])?;
    let mean = w.get(&format!("{bn}.running_mean"), &[cout])?;
    let var = w.get(&format!("{bn}.running_var"), &[cout])?;
    // num_batches_tracked only matters for training.
    w.tensors.remove(&format!("{bn}.num_batches_tracked"));
    let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
    let weight = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
    let bias = (beta - (mean * &scale)?)?;
    Ok((weight, bias))
}

/// The 3x3 stride-2 stem: the only full convolution, and the only layer that
/// sees the NCHW input. It hands NHWC activations to the rest of the network,
/// which is what lets the depthwise kernel vectorise over channels and every
/// 1x1 convolution be a single GEMM.
#[derive(Debug, Clone)]
struct Stem {
    weight: Tensor,
    dense: Dense,
    epilogue: Epilogue,
}

const STEM_KERNEL: usize = 3;
const STEM_STRIDE: usize = 2;

impl Stem {
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            dense: self.dense.clone(),
            epilogue: self.epilogue.to_dtype(dtype)?,
        })
    }

    /// The stem, and its folded bias for the fused network.
    fn load(w: &mut Weights) -> Result<(Self, Tensor)> {
        let (weight, bias) =
            load_conv_bn(w, "_conv_stem", "_bn0", (STEM_CHANNELS, 3, STEM_KERNEL))?;
        Ok((
            Self {
                dense: Dense::new(&weight, STEM_STRIDE)?,
                epilogue: Epilogue::new(&bias, true)?,
                weight,
            },
            bias,
        ))
    }

    /// `[N, 3, H, W]` in, `[N, H/2, W/2, 32]` out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let y = x.contiguous()?.apply_op1_no_bwd(&self.dense)?;
            return self.epilogue.apply(y, None);
        }
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom) = same_padding(h, STEM_KERNEL, STEM_STRIDE);
        let (left, right) = same_padding(w, STEM_KERNEL, STEM_STRIDE);
        // candle pads symmetrically only; pad explicitly for the TF case.
        let y = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?
            .conv2d(&self.weight, 0, STEM_STRIDE, 1, 1)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        self.epilogue.apply(y, None)
    }
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    skip: bool,
}

impl MbConv {
    /// The depthwise layer stays f32: its CUDA kernel computes in f32.
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            expand: self
                .expand
                .as_ref()
                .map(|e| e.to_dtype(dtype))
                .transpose()?,
            depthwise: self.depthwise.clone(),
            project: self.project.to_dtype(dtype)?,
            skip: self.skip,
        })
    }

    /// The block, and the same weights packed for the fused network.
    fn load(w: &mut Weights, index: usize, s: BlockSpec) -> Result<(Self, fused::Block)> {
        let p = format!("_blocks.{index}");
        let mid = s.cin * s.expand;
        let expand = if s.expand == 1 {
            None
        } else {
            Some(load_conv_bn(
                w,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                (mid, s.cin, 1),
            )?)
        };
        let depthwise = load_conv_bn(
            w,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            (mid, 1, s.kernel),
        )?;
        let project = load_conv_bn(
            w,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            (s.cout, mid, 1),
        )?;
        let packed = fused::Block::new(
            s,
            expand.as_ref().map(|(w, b)| (w, b)),
            (&depthwise.0, &depthwise.1),
            (&project.0, &project.1),
        )?;
        let block = Self {
            expand: expand
                .map(|(weight, bias)| Pointwise::new(&weight, &bias, true))
                .transpose()?,
            depthwise: Depthwise::new(&depthwise.0, &depthwise.1, s.stride, true)?,
            project: Pointwise::new(&project.0, &project.1, false)?,
            skip: s.stride == 1 && s.cin == s.cout,
        };
        Ok((block, packed))
    }

    /// NHWC in and out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => self.depthwise.forward(&e.forward(x, None)?)?,
            None => self.depthwise.forward(x)?,
        };
        self.project.forward(&y, self.skip.then_some(x))
    }
}

/// EfficientNet-Lite0 with BatchNorm folded into the convolutions.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: Stem,
    blocks: Vec<MbConv>,
    head: Pointwise,
    fc_weight: Tensor,
    fc_bias: Tensor,
    /// The whole network fused, for the CPU.
    fused: Option<Arc<fused::Fused>>,
    device: Device,
    dtype: DType,
}

impl EfficientNetLite0 {
    /// Builds the network from `efficientnet_pytorch`-named tensors; every
    /// tensor must be used, so a checkpoint of another variant is refused.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        Self::from_tensors_as(tensors, device, DType::F32)
    }

    /// [`Self::from_tensors`] computing in `dtype`. BatchNorm is folded in f32 first either way. On CUDA f16
    /// and bf16 run every layer in that type; on the CPU bf16 (where the CPU has AVX512-BF16) rounds the
    /// operands of the convolutions' and classifier's products to bf16 and sums them in f32.
    pub fn from_tensors_as(
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if device.is_cpu() {
            match dtype {
                DType::F32 => {}
                DType::BF16 if Isa::has_bf16() => {}
                DType::BF16 => candle_core::bail!(
                    "bf16 on the CPU needs AVX512-BF16, which this CPU does not have: use f32"
                ),
                other => candle_core::bail!(
                    "{other:?} on the CPU: use f32, or bf16 on a CPU with AVX512-BF16"
                ),
            }
        }
        let mut w = Weights {
            tensors,
            device: device.clone(),
        };
        let (stem, stem_bias) = Stem::load(&mut w)?;
        let (blocks, packed): (Vec<_>, Vec<_>) = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, s)| MbConv::load(&mut w, i, *s))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let last = BLOCKS[BLOCKS.len() - 1].cout;
        let (weight, bias) = load_conv_bn(&mut w, "_conv_head", "_bn1", (HEAD_CHANNELS, last, 1))?;
        let head = Pointwise::new(&weight, &bias, true)?;
        let fc = w.get("_fc.weight", &[NUM_CLASSES, HEAD_CHANNELS])?;
        let fc_bias = w.get("_fc.bias", &[NUM_CLASSES])?;
        // The fused network's portable kernels are there to check the SIMD ones against: a CPU without AVX2
        // and FMA runs the layers through candle, whose GEMM has SSE kernels of its own.
        let fused = (device.is_cpu() && Isa::detect() != Isa::Portable)
            .then(|| {
                fused::Fused::new(
                    Isa::detect(),
                    dtype == DType::BF16,
                    (&stem.weight, &stem_bias),
                    packed,
                    (&weight, &bias),
                    (&fc, &fc_bias),
                )
            })
            .transpose()?
            .map(Arc::new);
        let fc_weight = fc.t()?.contiguous()?;
        let mut unused: Vec<_> = w.tensors.keys().cloned().collect();
        if !unused.is_empty() {
            unused.sort();
            candle_core::bail!(
                "checkpoint has tensors EfficientNet-Lite0 does not use: {unused:?}"
            );
        }
        let net = Self {
            stem,
            blocks,
            head,
            fc_weight,
            fc_bias,
            fused,
            device: device.clone(),
            dtype: DType::F32,
        };
        // On the CPU the fused network does the reduced-precision work; the
        // layers stay f32 as its check.
        if dtype == DType::F32 || device.is_cpu() {
            return Ok(net);
        }
        Ok(Self {
            stem: net.stem.to_dtype(dtype)?,
            blocks: net
                .blocks
                .iter()
                .map(|b| b.to_dtype(dtype))
                .collect::<Result<_>>()?,
            head: net.head.to_dtype(dtype)?,
            fc_weight: net.fc_weight.to_dtype(dtype)?,
            fc_bias: net.fc_bias.to_dtype(dtype)?,
            fused: None,
            device: net.device,
            dtype,
        })
    }

    /// Loads the network from a safetensors file.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        Self::load_as(path, device, DType::F32)
    }

    /// Loads the network from a safetensors file, computing in `dtype`.
    pub fn load_as(path: &std::path::Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_tensors_as(
            candle_core::safetensors::load(path, &Device::Cpu)?,
            device,
            dtype,
        )
    }

    /// Runs the fused CPU network with `isa`'s kernels instead of the widest
    /// this CPU has (the caller checks it is available); for comparing them.
    pub fn with_cpu_kernels(mut self, isa: Isa) -> Self {
        self.fused = self.fused.map(|f| Arc::new(f.with_isa(isa)));
        self
    }

    /// Whether the fused CPU network multiplies in bf16.
    pub fn cpu_bf16(&self) -> bool {
        self.fused.as_ref().is_some_and(|f| f.bf16())
    }

    /// The instruction set the fused CPU network runs, if this model has one.
    pub fn cpu_kernels(&self) -> Option<Isa> {
        self.fused.as_ref().map(|f| f.isa())
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Module for EfficientNetLite0 {
    /// Normalised `[N, 3, 224, 224]` in, f32 logits `[N, 1000]` out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(fused) = &self.fused
            && x.device().is_cpu()
        {
            return x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(fused.as_ref());
        }
        self.forward_layers(x)
    }
}

impl EfficientNetLite0 {
    /// One layer at a time, on candle tensors: the path for CUDA and reduced
    /// precision, and the fused network's check.
    pub fn forward_layers(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.stem.forward(&x.to_dtype(self.dtype)?)?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        let y = self.head.forward(&y, None)?;
        let (n, h, w, c) = y.dims4()?;
        let y = y.reshape((n, h * w, c))?.mean(1)?;
        y.matmul(&self.fc_weight)?
            .broadcast_add(&self.fc_bias)?
            .to_dtype(DType::F32)
    }
}
