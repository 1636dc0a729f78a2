//! EfficientNet-Lite0 (ImageNet-1k) on candle, from weights in the
//! `efficientnet_pytorch` key layout.
//!
//! Lite differs from B0: ReLU6 instead of swish, no squeeze-excite, fixed stem
//! and head. The checkpoint was converted from TensorFlow, so BatchNorm uses
//! eps 1e-3 and convolutions use TensorFlow "same" padding, which is asymmetric
//! for stride 2; both change logits by more than 1 if done the PyTorch way.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};

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

/// A convolution with its BatchNorm folded in at load time, so inference is
/// one convolution plus a bias instead of five passes over the activations.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    groups: usize,
    relu6: bool,
}

impl ConvBn {
    fn load(
        w: &mut Weights,
        conv: &str,
        bn: &str,
        (cout, cin_per_group, kernel): (usize, usize, usize),
        stride: usize,
        groups: usize,
        relu6: bool,
    ) -> Result<Self> {
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
        Ok(Self {
            weight,
            bias: bias.reshape((1, cout, 1, 1))?,
            kernel,
            stride,
            groups,
            relu6,
        })
    }
}

/// TensorFlow "same" padding for one spatial dimension: the output is
/// ceil(size / stride) and any odd padding goes after, not before.
fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom) = same_padding(h, self.kernel, self.stride);
        let (left, right) = same_padding(w, self.kernel, self.stride);
        let y = if top == bottom && left == right && top == left {
            x.conv2d(&self.weight, top, self.stride, 1, self.groups)?
        } else {
            // candle pads symmetrically only; pad explicitly for the TF case.
            x.pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, left, right)?
                .conv2d(&self.weight, 0, self.stride, 1, self.groups)?
        };
        let y = y.broadcast_add(&self.bias)?;
        if self.relu6 {
            y.clamp(0f32, 6f32)
        } else {
            Ok(y)
        }
    }
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

impl MbConv {
    fn load(w: &mut Weights, index: usize, s: BlockSpec) -> Result<Self> {
        let p = format!("_blocks.{index}");
        let mid = s.cin * s.expand;
        let expand = if s.expand == 1 {
            None
        } else {
            Some(ConvBn::load(
                w,
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                (mid, s.cin, 1),
                1,
                1,
                true,
            )?)
        };
        let depthwise = ConvBn::load(
            w,
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            (mid, 1, s.kernel),
            s.stride,
            mid,
            true,
        )?;
        let project = ConvBn::load(
            w,
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            (s.cout, mid, 1),
            1,
            1,
            false,
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            skip: s.stride == 1 && s.cin == s.cout,
        })
    }
}

impl Module for MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        y = self.depthwise.forward(&y)?;
        y = self.project.forward(&y)?;
        if self.skip { y + x } else { Ok(y) }
    }
}

/// EfficientNet-Lite0 with BatchNorm folded into the convolutions.
#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    fc_weight: Tensor,
    fc_bias: Tensor,
    device: Device,
}

impl EfficientNetLite0 {
    /// Builds the network from `efficientnet_pytorch`-named tensors; every
    /// tensor must be used, so a checkpoint of another variant is refused.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let mut w = Weights {
            tensors,
            device: device.clone(),
        };
        let stem = ConvBn::load(
            &mut w,
            "_conv_stem",
            "_bn0",
            (STEM_CHANNELS, 3, 3),
            2,
            1,
            true,
        )?;
        let blocks = BLOCKS
            .iter()
            .enumerate()
            .map(|(i, s)| MbConv::load(&mut w, i, *s))
            .collect::<Result<Vec<_>>>()?;
        let last = BLOCKS[BLOCKS.len() - 1].cout;
        let head = ConvBn::load(
            &mut w,
            "_conv_head",
            "_bn1",
            (HEAD_CHANNELS, last, 1),
            1,
            1,
            true,
        )?;
        let fc_weight = w
            .get("_fc.weight", &[NUM_CLASSES, HEAD_CHANNELS])?
            .t()?
            .contiguous()?;
        let fc_bias = w.get("_fc.bias", &[NUM_CLASSES])?;
        let mut unused: Vec<_> = w.tensors.keys().cloned().collect();
        if !unused.is_empty() {
            unused.sort();
            candle_core::bail!(
                "checkpoint has tensors EfficientNet-Lite0 does not use: {unused:?}"
            );
        }
        Ok(Self {
            stem,
            blocks,
            head,
            fc_weight,
            fc_bias,
            device: device.clone(),
        })
    }

    /// Loads the network from a safetensors file.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        Self::from_tensors(candle_core::safetensors::load(path, &Device::Cpu)?, device)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Module for EfficientNetLite0 {
    /// Normalised f32 `[N, 3, 224, 224]` in, logits `[N, 1000]` out.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.stem.forward(x)?;
        for block in &self.blocks {
            y = block.forward(&y)?;
        }
        let y = self.head.forward(&y)?.mean((2, 3))?;
        y.matmul(&self.fc_weight)?.broadcast_add(&self.fc_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(56, 3, 1), (1, 1));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        // Odd sizes pad symmetrically for stride 2 with a 3x3 kernel.
        assert_eq!(same_padding(7, 3, 2), (1, 1));
    }
}
