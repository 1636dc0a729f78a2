//! Reader for darknet networks: the `.cfg` text that describes the layers and the `.weights`
//! binary that holds their parameters, as the official YOLO releases ship them.
//!
//! The cfg is INI-like: a `[net]` section, then one section per layer in order; `#` and `;` start
//! comments. The weights file is a header (major, minor and revision as int32, then the count of
//! images seen: int64 from format 0.2 on, int32 before), then for each convolutional layer in cfg
//! order its biases, its batch-norm scales, means and variances when it has batch norm, and its
//! kernel in OIHW order, all little-endian float32. Nothing else in the file says where one layer
//! ends, so the reader derives every layer's input channels from the cfg and counts the bytes.

use std::fmt;
use std::path::{Path, PathBuf};

/// A layer's activation function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `leaky`: `x` above zero, `0.1 x` below.
    Leaky,
    /// `linear`: none.
    Linear,
}

/// One `[yolo]` head: which of the network's anchors it predicts, in input pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloHead {
    /// Indices into `anchors` of the boxes this head predicts.
    pub mask: Vec<usize>,
    /// Every anchor of the network as (width, height) in input pixels; each head uses those of `mask`.
    pub anchors: Vec<(f32, f32)>,
    pub classes: usize,
}

/// One layer of the network, as the cfg describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    Convolutional {
        filters: usize,
        size: usize,
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
        batch_normalize: bool,
        activation: Activation,
    },
    /// Max over `size`x`size` windows; with stride 1, darknet pads right and bottom so the size is kept.
    MaxPool {
        size: usize,
        stride: usize,
    },
    /// The channel concatenation of earlier layers' outputs: absolute indices, already resolved.
    Route {
        layers: Vec<usize>,
    },
    /// Nearest-neighbour upsampling by `stride`.
    Upsample {
        stride: usize,
    },
    Yolo(YoloHead),
}

/// A whole network: its input and its layers in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub layers: Vec<Layer>,
}

/// The parameters of one convolutional layer, as stored in the weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvWeights {
    /// The layer's index in the cfg (its `[net]` section not counted).
    pub layer: usize,
    pub biases: Vec<f32>,
    pub batch_norm: Option<BatchNorm>,
    /// `[filters, channels, size, size]`, row-major.
    pub kernel: Vec<f32>,
    pub shape: [usize; 4],
}

/// Batch-norm statistics of one convolutional layer, not yet folded into its kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    pub scales: Vec<f32>,
    pub means: Vec<f32>,
    pub variances: Vec<f32>,
}

/// Why a cfg or weights file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DarknetError {
    #[error("reading `{path}`")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cfg line {line}: {message}")]
    Cfg { line: usize, message: String },
    #[error(
        "the weights file ends inside layer {layer} ({kind}): its {part} needs {needed} more bytes, {available} are \
         left; the file is truncated or belongs to another cfg"
    )]
    Truncated {
        layer: usize,
        kind: &'static str,
        part: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("layer {layer}: {message}")]
    Layers { layer: usize, message: String },
    #[error("the weights file is {size} bytes, too short for its {needed}-byte header")]
    Header { size: usize, needed: usize },
    #[error(
        "the weights file has {extra} bytes after the last layer's parameters: it belongs to another cfg (the cfg's \
         layers take {used} bytes)"
    )]
    TrailingBytes { extra: usize, used: usize },
}

impl DarknetError {
    fn cfg(line: usize, message: impl Into<String>) -> Self {
        Self::Cfg {
            line,
            message: message.into(),
        }
    }
}

/// One `[section]` of the cfg with its `key=value` options, in file order.
struct Section {
    name: String,
    line: usize,
    options: Vec<(String, String, usize)>,
}

impl Section {
    fn get(&self, key: &str) -> Option<(&str, usize)> {
        self.options
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, line)| (v.as_str(), *line))
    }

    fn number<T: std::str::FromStr>(
        &self,
        key: &str,
        default: Option<T>,
    ) -> Result<T, DarknetError> {
        match self.get(key) {
            Some((value, line)) => value.parse().map_err(|_| {
                DarknetError::cfg(
                    line,
                    format!(
                        "`{key}` of [{}] is not a valid number: `{value}`",
                        self.name
                    ),
                )
            }),
            None => default.ok_or_else(|| {
                DarknetError::cfg(self.line, format!("[{}] needs `{key}`", self.name))
            }),
        }
    }

    fn list<T: std::str::FromStr>(&self, key: &str) -> Result<Vec<T>, DarknetError> {
        let Some((value, line)) = self.get(key) else {
            return Err(DarknetError::cfg(
                self.line,
                format!("[{}] needs `{key}`", self.name),
            ));
        };
        value
            .split(',')
            .map(|item| {
                item.trim().parse().map_err(|_| {
                    DarknetError::cfg(
                        line,
                        format!(
                            "`{key}` of [{}] has an invalid item `{}`",
                            self.name,
                            item.trim()
                        ),
                    )
                })
            })
            .collect()
    }
}

fn sections(text: &str) -> Result<Vec<Section>, DarknetError> {
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split(['#', ';']).next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(name) = content.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or_else(|| {
                DarknetError::cfg(line, format!("unclosed section header `{content}`"))
            })?;
            sections.push(Section {
                name: name.trim().to_owned(),
                line,
                options: Vec::new(),
            });
            continue;
        }
        let (key, value) = content.split_once('=').ok_or_else(|| {
            DarknetError::cfg(line, format!("expected `key=value`, found `{content}`"))
        })?;
        let section = sections
            .last_mut()
            .ok_or_else(|| DarknetError::cfg(line, "an option before the first [section]"))?;
        section
            .options
            .push((key.trim().to_owned(), value.trim().to_owned(), line));
    }
    Ok(sections)
}

impl Network {
    /// Parses a cfg and checks that its layers fit together (routes point backwards, a `[yolo]` head's
    /// input has `mask.len() * (classes + 5)` channels).
    pub fn parse(text: &str) -> Result<Self, DarknetError> {
        let mut sections = sections(text)?.into_iter();
        let net = sections
            .next()
            .filter(|s| s.name == "net" || s.name == "network")
            .ok_or_else(|| DarknetError::cfg(1, "the cfg must start with a [net] section"))?;
        let width = net.number("width", None)?;
        let height = net.number("height", None)?;
        let channels = net.number("channels", Some(3))?;
        let mut layers = Vec::new();
        for s in sections {
            let index = layers.len();
            let layer = match s.name.as_str() {
                "convolutional" => {
                    let size: usize = s.number("size", Some(1))?;
                    let pad: usize = s.number("pad", Some(0))?;
                    let padding = if pad != 0 {
                        size / 2
                    } else {
                        s.number("padding", Some(0))?
                    };
                    let activation = match s.get("activation").map_or("logistic", |(v, _)| v) {
                        "leaky" => Activation::Leaky,
                        "linear" => Activation::Linear,
                        other => {
                            return Err(DarknetError::cfg(
                                s.line,
                                format!(
                                    "activation `{other}` of layer {index} is not supported (leaky, linear)"
                                ),
                            ));
                        }
                    };
                    Layer::Convolutional {
                        filters: s.number("filters", None)?,
                        size,
                        stride: s.number("stride", Some(1))?,
                        padding,
                        batch_normalize: s.number::<u8>("batch_normalize", Some(0))? != 0,
                        activation,
                    }
                }
                "maxpool" => {
                    let stride = s.number("stride", Some(1))?;
                    Layer::MaxPool {
                        size: s.number("size", Some(stride))?,
                        stride,
                    }
                }
                "route" => {
                    let relative: Vec<isize> = s.list("layers")?;
                    let layers = relative
                        .iter()
                        .map(|&r| {
                            let absolute = if r < 0 { index as isize + r } else { r };
                            usize::try_from(absolute).ok().filter(|&a| a < index).ok_or_else(|| {
                                DarknetError::cfg(s.line, format!("route {index} points at layer {r}, which is not before it"))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    Layer::Route { layers }
                }
                "upsample" => Layer::Upsample {
                    stride: s.number("stride", Some(2))?,
                },
                "yolo" => {
                    let anchors: Vec<f32> = s.list("anchors")?;
                    if !anchors.len().is_multiple_of(2) {
                        return Err(DarknetError::cfg(
                            s.line,
                            "`anchors` must hold width,height pairs",
                        ));
                    }
                    let anchors: Vec<(f32, f32)> =
                        anchors.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    let mask: Vec<usize> = s.list("mask")?;
                    if let Some(bad) = mask.iter().find(|&&m| m >= anchors.len()) {
                        return Err(DarknetError::cfg(
                            s.line,
                            format!(
                                "mask index {bad} of layer {index} is past the {} anchors",
                                anchors.len()
                            ),
                        ));
                    }
                    Layer::Yolo(YoloHead {
                        mask,
                        anchors,
                        classes: s.number("classes", None)?,
                    })
                }
                other => {
                    return Err(DarknetError::cfg(
                        s.line,
                        format!("layer type [{other}] is not supported"),
                    ));
                }
            };
            layers.push(layer);
        }
        let network = Self {
            width,
            height,
            channels,
            layers,
        };
        network.output_channels()?;
        Ok(network)
    }

    /// The channels each layer outputs, checked against what each layer needs.
    pub fn output_channels(&self) -> Result<Vec<usize>, DarknetError> {
        let mut out: Vec<usize> = Vec::with_capacity(self.layers.len());
        for (index, layer) in self.layers.iter().enumerate() {
            let input = out.last().copied().unwrap_or(self.channels);
            let channels = match layer {
                Layer::Convolutional { filters, .. } => *filters,
                Layer::MaxPool { .. } | Layer::Upsample { .. } => input,
                Layer::Route { layers } => layers.iter().map(|&l| out[l]).sum(),
                Layer::Yolo(head) => {
                    let expected = head.mask.len() * (head.classes + 5);
                    if input != expected {
                        return Err(DarknetError::Layers {
                            layer: index,
                            message: format!(
                                "[yolo] gets {input} channels, but {} anchors of {} classes need {expected}",
                                head.mask.len(),
                                head.classes
                            ),
                        });
                    }
                    input
                }
            };
            out.push(channels);
        }
        Ok(out)
    }

    /// Reads the parameters of every convolutional layer from a weights file's bytes. The file must
    /// hold exactly what the cfg's layers need.
    pub fn read_weights(&self, bytes: &[u8]) -> Result<Vec<ConvWeights>, DarknetError> {
        let mut reader = Reader { bytes, offset: 0 };
        let header = |needed| DarknetError::Header {
            size: bytes.len(),
            needed,
        };
        let major = reader.i32().ok_or_else(|| header(12))?;
        let minor = reader.i32().ok_or_else(|| header(12))?;
        let _revision = reader.i32().ok_or_else(|| header(12))?;
        let seen_bytes = if major * 10 + minor >= 2 { 8 } else { 4 };
        if reader.take(seen_bytes).is_none() {
            return Err(header(12 + seen_bytes));
        }
        let convs = self.convolutions(|layer, part, count| {
            reader.f32s(count).ok_or(DarknetError::Truncated {
                layer,
                kind: "convolutional",
                part: part.description(),
                needed: count * 4,
                available: reader.remaining(),
            })
        })?;
        if reader.remaining() > 0 {
            return Err(DarknetError::TrailingBytes {
                extra: reader.remaining(),
                used: reader.offset,
            });
        }
        Ok(convs)
    }
}

impl Network {
    /// The parameters of every convolutional layer, in the weights file's order, each part's `count` values
    /// taken from `part`: whatever stores them, the cfg decides what there must be and how much.
    pub fn convolutions(
        &self,
        mut part: impl FnMut(usize, Part, usize) -> Result<Vec<f32>, DarknetError>,
    ) -> Result<Vec<ConvWeights>, DarknetError> {
        let channels = self.output_channels()?;
        let mut convs = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let Layer::Convolutional {
                filters,
                size,
                batch_normalize,
                ..
            } = *layer
            else {
                continue;
            };
            let input = if index == 0 {
                self.channels
            } else {
                channels[index - 1]
            };
            let biases = part(index, Part::Biases, filters)?;
            let batch_norm = if batch_normalize {
                Some(BatchNorm {
                    scales: part(index, Part::Scales, filters)?,
                    means: part(index, Part::Means, filters)?,
                    variances: part(index, Part::Variances, filters)?,
                })
            } else {
                None
            };
            let shape = [filters, input, size, size];
            let kernel = part(index, Part::Kernel, shape.iter().product())?;
            convs.push(ConvWeights {
                layer: index,
                biases,
                batch_norm,
                kernel,
                shape,
            });
        }
        Ok(convs)
    }
}

/// One part of a convolutional layer's parameters, in the order the weights file stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Biases,
    Scales,
    Means,
    Variances,
    Kernel,
}

impl Part {
    /// Every part, in file order.
    pub const ALL: [Part; 5] = [
        Part::Biases,
        Part::Scales,
        Part::Means,
        Part::Variances,
        Part::Kernel,
    ];

    /// What an error message calls it.
    pub fn description(self) -> &'static str {
        match self {
            Part::Biases => "biases",
            Part::Scales => "batch-norm scales",
            Part::Means => "batch-norm means",
            Part::Variances => "batch-norm variances",
            Part::Kernel => "kernel",
        }
    }

    /// The name of its tensor in a model repository's safetensors file: `<layer>.<key>`.
    pub fn key(self) -> &'static str {
        match self {
            Part::Biases => "biases",
            Part::Scales => "scales",
            Part::Means => "means",
            Part::Variances => "variances",
            Part::Kernel => "kernel",
        }
    }

    /// The tensor name of this part of `layer`.
    pub fn tensor_name(self, layer: usize) -> String {
        format!("{layer}.{}", self.key())
    }

    /// This part of a layer's parameters, if it has it.
    pub fn of(self, w: &ConvWeights) -> Option<&[f32]> {
        let bn = w.batch_norm.as_ref();
        match self {
            Part::Biases => Some(&w.biases),
            Part::Scales => bn.map(|b| b.scales.as_slice()),
            Part::Means => bn.map(|b| b.means.as_slice()),
            Part::Variances => bn.map(|b| b.variances.as_slice()),
            Part::Kernel => Some(&w.kernel),
        }
    }
}

/// Corrects the published `yolov3-tiny.cfg`, whose second head has `mask = 0,1,2`: the released weights were
/// trained with 1,2,3 (anchors 23,27 37,58 81,82), and with 0,1,2 their COCO mAP@0.5 falls from 33.1 % to about
/// 18 %. Changes nothing unless the network has two heads over six anchors and the second's mask is 0,1,2;
/// says whether it changed it.
pub fn correct_yolov3_tiny_mask(network: &mut Network) -> bool {
    let mut heads = network.layers.iter_mut().filter_map(|l| match l {
        Layer::Yolo(head) => Some(head),
        _ => None,
    });
    let (Some(_), Some(second), None) = (heads.next(), heads.next(), heads.next()) else {
        return false;
    };
    if second.anchors.len() != 6 || second.mask != [0, 1, 2] {
        return false;
    }
    second.mask = vec![1, 2, 3];
    true
}

/// `text`, a cfg, with the `mask` of its `head`-th `[yolo]` section (from 0) set to `mask`; `None` if that
/// section has no `mask` line. Everything else, comments included, stays as it was.
pub fn with_mask(text: &str, head: usize, mask: &[usize]) -> Option<String> {
    let mut heads_seen = 0;
    let mut replaced = false;
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if trimmed == "[yolo]" {
                heads_seen += 1;
            }
        } else if !replaced
            && heads_seen == head + 1
            && trimmed.split('=').next().map(str::trim) == Some("mask")
        {
            let values: Vec<String> = mask.iter().map(usize::to_string).collect();
            out.push_str(&format!("mask = {}\n", values.join(",")));
            replaced = true;
            continue;
        }
        out.push_str(line);
    }
    replaced.then_some(out)
}

/// Reads a cfg file and its weights file.
pub fn read(cfg: &Path, weights: &Path) -> Result<(Network, Vec<ConvWeights>), DarknetError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DarknetError::Io { path, source }
    };
    let text = std::fs::read_to_string(cfg).map_err(io(cfg))?;
    let network = Network::parse(&text)?;
    let bytes = std::fs::read(weights).map_err(io(weights))?;
    let convs = network.read_weights(&bytes)?;
    Ok((network, convs))
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self
            .offset
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Some(slice)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f32s(&mut self, count: usize) -> Option<Vec<f32>> {
        let bytes = self.take(count.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Leaky => "leaky",
            Self::Linear => "linear",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = "
# comment
[net]
width=8
height=8
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=14   ; 2 anchors of 2 classes
size=1
stride=1
pad=1
activation=linear

[yolo]
mask = 0,1
anchors = 10,14,  23,27,  37,58
classes=2

[route]
layers = -3

[upsample]
stride=2

[route]
layers = -1, 0
";

    #[test]
    fn with_mask_rewrites_only_the_named_head() {
        let text = TINY.replace(
            "classes=2\n",
            "classes=2\n\n[yolo]\nmask = 0,1\nanchors = 10,14,  23,27,  37,58\nclasses=2\n",
        );
        let edited = with_mask(&text, 1, &[1, 2]).unwrap();
        let masks: Vec<Vec<usize>> = Network::parse(&edited)
            .unwrap()
            .layers
            .into_iter()
            .filter_map(|l| match l {
                Layer::Yolo(head) => Some(head.mask),
                _ => None,
            })
            .collect();
        assert_eq!(masks, [vec![0, 1], vec![1, 2]]);
        assert!(edited.contains("# comment"));
        assert_eq!(with_mask(&text, 2, &[0]), None);
    }

    /// The bytes a weights file for [`TINY`] holds: header, then layer 0 (4 biases, 3x4 batch norm, 4x3x3x3
    /// kernel), then layer 2 (14 biases, 14x4x1x1 kernel).
    fn tiny_weights() -> Vec<u8> {
        let mut bytes = Vec::new();
        for v in [0i32, 2, 5] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&7u64.to_le_bytes());
        let floats = 4 + 12 + 4 * 27 + 14 + 14 * 4;
        for i in 0..floats {
            bytes.extend_from_slice(&(i as f32).to_le_bytes());
        }
        bytes
    }

    #[test]
    fn parses_layers_and_resolves_routes() {
        let net = Network::parse(TINY).unwrap();
        assert_eq!((net.width, net.height, net.channels), (8, 8, 3));
        assert_eq!(net.layers.len(), 7);
        assert_eq!(
            net.layers[0],
            Layer::Convolutional {
                filters: 4,
                size: 3,
                stride: 1,
                padding: 1,
                batch_normalize: true,
                activation: Activation::Leaky
            }
        );
        assert_eq!(net.layers[1], Layer::MaxPool { size: 2, stride: 2 });
        let Layer::Yolo(head) = &net.layers[3] else {
            panic!("layer 3 is the head");
        };
        assert_eq!(head.mask, [0, 1]);
        assert_eq!(head.anchors, [(10.0, 14.0), (23.0, 27.0), (37.0, 58.0)]);
        assert_eq!(net.layers[4], Layer::Route { layers: vec![1] });
        assert_eq!(net.layers[6], Layer::Route { layers: vec![5, 0] });
        assert_eq!(net.output_channels().unwrap(), [4, 4, 14, 14, 4, 4, 8]);
    }

    #[test]
    fn reads_every_convolution_in_cfg_order() {
        let net = Network::parse(TINY).unwrap();
        let convs = net.read_weights(&tiny_weights()).unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!((convs[0].layer, convs[0].shape), (0, [4, 3, 3, 3]));
        assert_eq!(convs[0].biases, [0.0, 1.0, 2.0, 3.0]);
        let bn = convs[0].batch_norm.as_ref().unwrap();
        assert_eq!(
            (bn.scales[0], bn.means[0], bn.variances[3]),
            (4.0, 8.0, 15.0)
        );
        assert_eq!((convs[0].kernel[0], convs[0].kernel.len()), (16.0, 108));
        assert_eq!((convs[1].layer, convs[1].shape), (2, [14, 4, 1, 1]));
        assert!(convs[1].batch_norm.is_none());
        assert_eq!(convs[1].biases[0], 124.0);
        assert_eq!(*convs[1].kernel.last().unwrap(), 193.0);
    }

    #[test]
    fn an_old_header_has_a_four_byte_seen_count() {
        let net = Network::parse(TINY).unwrap();
        let mut bytes = tiny_weights();
        bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        bytes.drain(16..20);
        assert_eq!(net.read_weights(&bytes).unwrap()[0].biases[0], 0.0);
    }

    #[test]
    fn a_truncated_file_names_the_layer_where_the_bytes_ran_out() {
        let net = Network::parse(TINY).unwrap();
        let bytes = tiny_weights();
        let e = net
            .read_weights(&bytes[..bytes.len() - 4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 2 (convolutional): its kernel needs 224 more bytes, 220 are left"),
            "{e}"
        );
        let e = net
            .read_weights(&bytes[..20 + 4 * 10])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 0 (convolutional): its batch-norm means"),
            "{e}"
        );
        let e = net.read_weights(&bytes[..10]).unwrap_err().to_string();
        assert!(e.contains("too short for its 12-byte header"), "{e}");
    }

    #[test]
    fn a_longer_file_belongs_to_another_cfg() {
        let net = Network::parse(TINY).unwrap();
        let mut bytes = tiny_weights();
        bytes.extend_from_slice(&[0; 8]);
        let e = net.read_weights(&bytes).unwrap_err().to_string();
        assert!(e.contains("8 bytes after the last layer"), "{e}");
    }

    #[test]
    fn only_the_second_head_of_two_with_the_published_mask_is_corrected() {
        let two_heads = "[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=21\nactivation=linear\n\
            [yolo]\nmask=3,4,5\nanchors=1,1,2,2,3,3,4,4,5,5,6,6\nclasses=2\n\
            [route]\nlayers=-2\n[yolo]\nmask=0,1,2\nanchors=1,1,2,2,3,3,4,4,5,5,6,6\nclasses=2\n";
        let mut net = Network::parse(two_heads).unwrap();
        assert!(correct_yolov3_tiny_mask(&mut net));
        let masks: Vec<Vec<usize>> = net
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::Yolo(h) => Some(h.mask.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(masks, [vec![3, 4, 5], vec![1, 2, 3]]);
        assert!(!correct_yolov3_tiny_mask(&mut net), "already corrected");
        let mut one_head = Network::parse(TINY).unwrap();
        assert!(!correct_yolov3_tiny_mask(&mut one_head));
    }

    #[test]
    fn a_bad_cfg_says_which_line_and_what_to_fix() {
        let cases = [
            (
                "[net]\nwidth=8\nheight=8\n[convolutional]\nactivation=linear\nfilters=x\n",
                "line 6: `filters` of [convolutional] is not a valid number",
            ),
            (
                "[net]\nwidth=8\nheight=8\n[route]\nlayers=-1\n",
                "route 0 points at layer -1",
            ),
            (
                "[net]\nwidth=8\nheight=8\n[shortcut]\nfrom=-3\n",
                "layer type [shortcut] is not supported",
            ),
            ("width=8\n", "line 1: an option before the first [section]"),
            (
                "[convolutional]\nfilters=1\n",
                "must start with a [net] section",
            ),
            ("[net]\nheight=8\n", "[net] needs `width`"),
            (
                "[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=6\nactivation=linear\n[yolo]\nmask=0\nanchors=1,2\nclasses=2\n",
                "gets 6 channels, but 1 anchors of 2 classes need 7",
            ),
            (
                "[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=7\nactivation=linear\n[yolo]\nmask=3\nanchors=1,2\nclasses=2\n",
                "mask index 3 of layer 1 is past the 1 anchors",
            ),
            (
                "[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=7\nactivation=mish\n",
                "activation `mish`",
            ),
        ];
        for (cfg, expected) in cases {
            let e = Network::parse(cfg).unwrap_err().to_string();
            assert!(e.contains(expected), "{cfg:?}: {e}");
        }
    }
}
