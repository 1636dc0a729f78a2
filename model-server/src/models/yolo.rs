//! YOLO detectors described by a darknet cfg (YOLOv3-tiny and its kin): convolutions with batch norm
//! folded in at load, leaky ReLU 0.1, max pools, routes, nearest-neighbour upsampling, and `[yolo]`
//! heads decoded into boxes on the device.

use candle_core::{D, DType, Device, Result, Tensor, bail};

use crate::convert::darknet::{Activation, ConvWeights, Layer, Network, YoloHead};
use crate::detections::{self, Detection, Selection};
use crate::kernels::isa::Isa;

mod cpu;

/// The epsilon under the square root of a batch norm's variance. darknet itself divides by
/// `sqrt(var) + 1e-6`; OpenCV's importer, the reference, by `sqrt(var + 1e-6)`. Either is far below
/// the tolerance on the outputs.
const BATCH_NORM_EPSILON: f32 = 1e-6;
/// The slope of darknet's leaky ReLU below zero.
const LEAKY_SLOPE: f64 = 0.1;

/// A convolution with its batch norm already folded into the kernel and bias.
struct Conv {
    kernel: Tensor,
    /// `[1, filters, 1, 1]`, to add to the output.
    bias: Tensor,
    stride: usize,
    padding: usize,
    activation: Activation,
}

/// How the convolutions run, with the weights laid out for it: one copy, whichever it is.
enum Ops {
    /// candle's operations, on any device.
    Candle(Vec<Option<Conv>>),
    /// The channels-last CPU path on the project's GEMM, with the instruction set it uses.
    ChannelsLast(Isa, Vec<Option<cpu::Conv>>),
}

/// A darknet YOLO network, ready to run.
pub struct Yolo {
    network: Network,
    /// One convolution per layer (`None` for the layers that are not convolutions).
    ops: Ops,
    device: Device,
}

/// The decoded predictions of one head for a batch: `[N, rows * columns * anchors, 5 + classes]`, one row
/// per (row, column, anchor) in that order, with columns cx, cy, w, h (fractions of the input),
/// objectness, then each class's score already multiplied by the objectness.
pub type HeadRows = Tensor;

impl Yolo {
    /// Builds the network from its cfg and the weights the darknet reader read, folding each batch norm
    /// into its convolution, on `device`: channels-last on the CPU, candle's operations elsewhere.
    pub fn new(network: Network, weights: Vec<ConvWeights>, device: &Device) -> Result<Self> {
        Self::build(network, weights, device, device.is_cpu())
    }

    /// As [`Yolo::new`], on candle's operations even on the CPU: the reference the channels-last path is
    /// tested against.
    pub fn with_candle_ops(
        network: Network,
        weights: Vec<ConvWeights>,
        device: &Device,
    ) -> Result<Self> {
        Self::build(network, weights, device, false)
    }

    fn build(
        network: Network,
        weights: Vec<ConvWeights>,
        device: &Device,
        channels_last: bool,
    ) -> Result<Self> {
        let mut filled = vec![false; network.layers.len()];
        let mut candle: Vec<Option<Conv>> = network.layers.iter().map(|_| None).collect();
        let mut packed: Vec<Option<cpu::Conv>> = network.layers.iter().map(|_| None).collect();
        for w in weights {
            let Some(Layer::Convolutional {
                stride,
                padding,
                activation,
                ..
            }) = network.layers.get(w.layer)
            else {
                bail!(
                    "yolo: weights for layer {}, which is not a convolution",
                    w.layer
                );
            };
            filled[w.layer] = true;
            let (kernel, bias) = fold(&w);
            if channels_last {
                packed[w.layer] = Some(cpu::Conv::new(
                    &kernel,
                    &bias,
                    w.shape,
                    *stride,
                    *padding,
                    *activation,
                ));
            } else {
                candle[w.layer] = Some(Conv {
                    kernel: Tensor::from_vec(kernel, w.shape.to_vec(), device)?,
                    bias: Tensor::from_vec(bias, (1, w.shape[0], 1, 1), device)?,
                    stride: *stride,
                    padding: *padding,
                    activation: *activation,
                });
            }
        }
        for (i, layer) in network.layers.iter().enumerate() {
            if matches!(layer, Layer::Convolutional { .. }) && !filled[i] {
                bail!("yolo: no weights for convolutional layer {i}");
            }
        }
        let ops = if channels_last {
            Ops::ChannelsLast(Isa::detect(), packed)
        } else {
            Ops::Candle(candle)
        };
        Ok(Self {
            network,
            ops,
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The `[yolo]` heads, in the order [`Yolo::forward`] returns their inputs.
    pub fn heads(&self) -> impl Iterator<Item = &YoloHead> {
        self.network.layers.iter().filter_map(|l| match l {
            Layer::Yolo(head) => Some(head),
            _ => None,
        })
    }

    /// Runs the network on `[N, channels, height, width]` f32 in [0, 1]; returns what each `[yolo]` head
    /// receives: `[N, anchors * (5 + classes), rows, columns]`, not yet decoded.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let convs = match &self.ops {
            Ops::ChannelsLast(isa, convs) => {
                let x = x.to_dtype(DType::F32)?;
                return crate::pools::with_pool_awake(|| {
                    cpu::forward(*isa, &self.network, convs, &x)
                });
            }
            Ops::Candle(convs) => convs,
        };
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.network.layers.len());
        let mut heads = Vec::new();
        for (i, layer) in self.network.layers.iter().enumerate() {
            let input = outputs.last().unwrap_or(x);
            let y = match layer {
                Layer::Convolutional { .. } => {
                    let Some(conv) = &convs[i] else {
                        bail!("yolo: no weights for convolutional layer {i}");
                    };
                    let y = input
                        .conv2d(&conv.kernel, conv.padding, conv.stride, 1, 1)?
                        .broadcast_add(&conv.bias)?;
                    match conv.activation {
                        Activation::Leaky => y.maximum(&(&y * LEAKY_SLOPE)?)?,
                        Activation::Linear => y,
                    }
                }
                Layer::MaxPool { size, stride } => max_pool(input, *size, *stride)?,
                Layer::Route { layers } => {
                    let parts: Vec<&Tensor> = layers.iter().map(|&l| &outputs[l]).collect();
                    Tensor::cat(&parts, 1)?
                }
                Layer::Upsample { stride } => {
                    let (_, _, h, w) = input.dims4()?;
                    input.upsample_nearest2d(h * stride, w * stride)?
                }
                Layer::Yolo(_) => {
                    heads.push(input.clone());
                    input.clone()
                }
            };
            outputs.push(y);
        }
        Ok(heads)
    }

    /// Decodes what `head` received (`raw`, as [`Yolo::forward`] returns it) into its rows.
    pub fn decode(&self, head: &YoloHead, raw: &Tensor) -> Result<HeadRows> {
        let (n, channels, rows, columns) = raw.dims4()?;
        let anchors = head.mask.len();
        let values = 5 + head.classes;
        if channels != anchors * values {
            bail!(
                "yolo: head input has {channels} channels, expected {anchors} anchors of {values} values"
            );
        }
        let device = raw.device();
        // [N, A, V, H, W] -> [N, H, W, A, V]: the reference's row order.
        let p = raw
            .reshape((n, anchors, values, rows, columns))?
            .permute((0, 3, 4, 1, 2))?
            .contiguous()?;
        let sigmoid = |t: Tensor| candle_nn::ops::sigmoid(&t);
        let column = Tensor::arange(0u32, columns as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((1, 1, columns, 1, 1))?;
        let row = Tensor::arange(0u32, rows as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((1, rows, 1, 1, 1))?;
        let cx = (sigmoid(p.narrow(D::Minus1, 0, 1)?)?.broadcast_add(&column)? / columns as f64)?;
        let cy = (sigmoid(p.narrow(D::Minus1, 1, 1)?)?.broadcast_add(&row)? / rows as f64)?;
        let (anchor_w, anchor_h): (Vec<f32>, Vec<f32>) = head
            .mask
            .iter()
            .map(|&m| {
                let (w, h) = head.anchors[m];
                (
                    w / self.network.width as f32,
                    h / self.network.height as f32,
                )
            })
            .unzip();
        let anchor_w = Tensor::from_vec(anchor_w, (1, 1, 1, anchors, 1), device)?;
        let anchor_h = Tensor::from_vec(anchor_h, (1, 1, 1, anchors, 1), device)?;
        let w = p.narrow(D::Minus1, 2, 1)?.exp()?.broadcast_mul(&anchor_w)?;
        let h = p.narrow(D::Minus1, 3, 1)?.exp()?.broadcast_mul(&anchor_h)?;
        let objectness = sigmoid(p.narrow(D::Minus1, 4, 1)?)?;
        let classes = sigmoid(p.narrow(D::Minus1, 5, head.classes)?)?.broadcast_mul(&objectness)?;
        Tensor::cat(&[cx, cy, w, h, objectness, classes], D::Minus1)?.reshape((
            n,
            rows * columns * anchors,
            values,
        ))
    }

    /// Runs the network on a batch and selects each image's detections with that image's `selections` entry:
    /// boxes in input pixels, highest score first.
    pub fn detect(&self, x: &Tensor, selections: &[Selection]) -> Result<Vec<Vec<Detection>>> {
        if selections.len() != x.dim(0)? {
            bail!(
                "yolo: {} selections for a batch of {}",
                selections.len(),
                x.dim(0)?
            );
        }
        let raw = self.forward(x)?;
        let rows = self
            .heads()
            .zip(&raw)
            .map(|(head, raw)| self.decode(head, raw))
            .collect::<Result<Vec<_>>>()?;
        // Every head predicts the same values per row, so the heads' rows join into one list per image.
        let rows = Tensor::cat(&rows, 1)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let (n, _, values) = rows.dims3()?;
        let (width, height) = (self.network.width as f32, self.network.height as f32);
        (0..n)
            .zip(selections)
            .map(|(i, selection)| {
                let image = rows.get(i)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(detections::select(&image, values, width, height, selection))
            })
            .collect()
    }
}

/// darknet's max pool: windows of `size` every `stride`, over an input padded by `size - 1` in all, the
/// smaller half before, so size 2 stride 1 keeps the size by padding right and bottom. Padding repeats the
/// edge, which leaves every maximum as darknet's (it skips the cells outside).
fn max_pool(x: &Tensor, size: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad = size - 1;
    let before = pad / 2;
    let padded = |n: usize| {
        let out = (n + pad - size) / stride + 1;
        let needed = (out - 1) * stride + size;
        needed.saturating_sub(n + before)
    };
    let (bottom, right) = (padded(h), padded(w));
    let x = if before > 0 || bottom > 0 {
        x.pad_with_same(2, before, bottom)?
    } else {
        x.clone()
    };
    let x = if before > 0 || right > 0 {
        x.pad_with_same(3, before, right)?
    } else {
        x
    };
    x.max_pool2d_with_stride(size, stride)
}

/// The kernel and bias of a convolution with its batch norm folded in: `scale * (conv(x) - mean) /
/// sqrt(var + eps) + bias` is `conv'(x) + bias'`.
fn fold(w: &ConvWeights) -> (Vec<f32>, Vec<f32>) {
    let Some(bn) = &w.batch_norm else {
        return (w.kernel.clone(), w.biases.clone());
    };
    let per_filter = w.kernel.len() / w.shape[0].max(1);
    let factors: Vec<f32> = bn
        .scales
        .iter()
        .zip(&bn.variances)
        .map(|(s, v)| s / (v + BATCH_NORM_EPSILON).sqrt())
        .collect();
    let kernel = w
        .kernel
        .chunks(per_filter)
        .zip(&factors)
        .flat_map(|(k, f)| k.iter().map(move |x| x * f))
        .collect();
    let bias = w
        .biases
        .iter()
        .zip(&bn.means)
        .zip(&factors)
        .map(|((b, m), f)| b - m * f)
        .collect();
    (kernel, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_of_stride_one_keeps_the_size_by_padding_right_and_bottom() {
        let x = Tensor::arange(0f32, 9., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let y = max_pool(&x, 2, 1).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [4., 5., 5., 7., 8., 8., 7., 8., 8.]
        );
        let y = max_pool(
            &x.pad_with_zeros(3, 0, 1)
                .unwrap()
                .pad_with_zeros(2, 0, 1)
                .unwrap(),
            2,
            2,
        )
        .unwrap();
        assert_eq!(y.dims4().unwrap(), (1, 1, 2, 2));
    }

    #[test]
    fn folding_a_batch_norm_gives_the_same_output() {
        use crate::convert::darknet::BatchNorm;
        let w = ConvWeights {
            layer: 0,
            biases: vec![0.5, -1.0],
            batch_norm: Some(BatchNorm {
                scales: vec![2.0, 0.5],
                means: vec![1.0, -3.0],
                variances: vec![4.0, 0.25],
            }),
            kernel: vec![1.0, 2.0, 3.0, 4.0],
            shape: [2, 2, 1, 1],
        };
        let (kernel, bias) = fold(&w);
        let x = [0.3f32, -0.7];
        for f in 0..2 {
            let conv: f32 = (0..2).map(|c| w.kernel[f * 2 + c] * x[c]).sum();
            let bn = w.batch_norm.as_ref().unwrap();
            let expected = bn.scales[f] * (conv - bn.means[f])
                / (bn.variances[f] + BATCH_NORM_EPSILON).sqrt()
                + w.biases[f];
            let folded: f32 = (0..2).map(|c| kernel[f * 2 + c] * x[c]).sum::<f32>() + bias[f];
            assert!(
                (folded - expected).abs() < 1e-5,
                "filter {f}: {folded} vs {expected}"
            );
        }
    }
}
