//! The darknet reader on the official YOLOv3-tiny files (`scripts/setup-model-repository.sh` puts them in `.cache/`).

mod common;

use common::darknet_file;
use model_server::convert::darknet::{self, Layer, Network};

fn network() -> Network {
    Network::parse(&std::fs::read_to_string(darknet_file("yolov3-tiny.cfg")).expect("cfg"))
        .expect("parse")
}

#[test]
fn the_official_cfg_has_the_yolov3_tiny_layers() {
    let net = network();
    assert_eq!((net.width, net.height, net.channels), (416, 416, 3));
    let count = |f: fn(&Layer) -> bool| net.layers.iter().filter(|l| f(l)).count();
    assert_eq!(net.layers.len(), 24);
    assert_eq!(count(|l| matches!(l, Layer::Convolutional { .. })), 13);
    assert_eq!(count(|l| matches!(l, Layer::MaxPool { .. })), 6);
    assert_eq!(count(|l| matches!(l, Layer::Yolo(_))), 2);
    // The last maxpool keeps 13x13: size 2, stride 1.
    assert_eq!(net.layers[11], Layer::MaxPool { size: 2, stride: 1 });
    assert_eq!(net.layers[17], Layer::Route { layers: vec![13] });
    assert_eq!(
        net.layers[20],
        Layer::Route {
            layers: vec![19, 8]
        }
    );
    let Layer::Yolo(head) = &net.layers[23] else {
        panic!("layer 23 is the second head");
    };
    // The cfg as published: the converter corrects this head's mask to 1,2,3, as the weights were trained.
    assert_eq!((head.mask.as_slice(), head.classes), (&[0, 1, 2][..], 80));
    assert_eq!(head.anchors[3], (81.0, 82.0));
}

#[test]
fn the_official_weights_fill_every_convolution_exactly() {
    let (net, convs) = darknet::read(
        &darknet_file("yolov3-tiny.cfg"),
        &darknet_file("yolov3-tiny.weights"),
    )
    .expect("read");
    assert_eq!(convs.len(), 13);
    let floats: usize = convs
        .iter()
        .map(|c| {
            c.biases.len()
                + c.kernel.len()
                + c.batch_norm.as_ref().map_or(0, |b| 3 * b.scales.len())
        })
        .sum();
    assert_eq!(floats, 8_858_734);
    assert_eq!((convs[0].layer, convs[0].shape), (0, [16, 3, 3, 3]));
    assert_eq!((convs[12].layer, convs[12].shape), (22, [255, 256, 1, 1]));
    assert!(convs[12].batch_norm.is_none());
    assert_eq!(
        convs.iter().filter(|c| c.batch_norm.is_some()).count(),
        11,
        "every convolution but the two before the heads"
    );
    // Read out of step, the statistics would be arbitrary floats: running variances are positive.
    for c in &convs {
        if let Some(bn) = &c.batch_norm {
            assert!(
                bn.variances.iter().all(|v| v.is_finite() && *v > 0.0),
                "layer {}",
                c.layer
            );
        }
        assert!(c.kernel.iter().all(|w| w.is_finite()), "layer {}", c.layer);
    }
    assert_eq!(net.output_channels().expect("channels")[22], 255);
}

#[test]
fn a_truncated_or_longer_weights_file_is_refused_naming_the_layer() {
    let net = network();
    let bytes = std::fs::read(darknet_file("yolov3-tiny.weights")).expect("weights");
    let e = net
        .read_weights(&bytes[..bytes.len() - 1000])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ends inside layer 22 (convolutional): its kernel"),
        "{e}"
    );
    // Header (20 bytes), then layer 0's 16 biases and 3x16 batch-norm values, then part of its kernel.
    let e = net
        .read_weights(&bytes[..20 + 64 * 4 + 100])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "ends inside layer 0 (convolutional): its kernel needs 1728 more bytes, 100 are left"
        ),
        "{e}"
    );
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    let e = net.read_weights(&longer).unwrap_err().to_string();
    assert!(e.contains("4 bytes after the last layer"), "{e}");
}
