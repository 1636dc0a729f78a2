//! YOLOv3-tiny on the golden letterboxed inputs against OpenCV's dnn module: both heads, decoded, within 1e-3.
//! The weights are the official darknet files (`scripts/setup-model-repository.sh`).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::darknet_file;
use model_server::convert::darknet::{self, ConvWeights, Network};
use model_server::models::yolo::Yolo;

const PHOTOS: [&str; 4] = ["camera", "coffee", "motorcycle_left", "clock_motion"];

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/yolo")
        .join(name)
}

/// The official network with the second head's mask as the weights were trained (1,2,3, not the 0,1,2
/// of the published cfg).
fn yolov3_tiny() -> Yolo {
    yolov3_tiny_with(Yolo::new)
}

/// As [`yolov3_tiny`], built by `build`.
fn yolov3_tiny_with(
    build: fn(Network, Vec<ConvWeights>, &Device) -> candle_core::Result<Yolo>,
) -> Yolo {
    let text = std::fs::read_to_string(darknet_file("yolov3-tiny.cfg")).expect("cfg");
    let mut network = Network::parse(&text).expect("parse");
    assert!(darknet::correct_yolov3_tiny_mask(&mut network));
    let bytes = std::fs::read(darknet_file("yolov3-tiny.weights")).expect("weights");
    let weights = network.read_weights(&bytes).expect("read weights");
    build(network, weights, &Device::Cpu).expect("build")
}

/// A golden letterboxed photo as the network's input: `[1, 3, 416, 416]` f32 in [0, 1].
fn letterboxed(photo: &str) -> Tensor {
    let pixels = Tensor::read_npy(golden(&format!("{photo}.letterbox.npy"))).expect("letterbox");
    assert_eq!(pixels.dims(), [416, 416, 3]);
    (pixels.to_dtype(DType::F32).unwrap() / 255.0)
        .and_then(|t| t.permute((2, 0, 1))?.unsqueeze(0)?.contiguous())
        .expect("input")
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

#[test]
fn both_heads_match_opencv_on_every_golden_input() {
    let yolo = yolov3_tiny();
    let heads: Vec<_> = yolo.heads().cloned().collect();
    assert_eq!(heads.len(), 2);
    for photo in PHOTOS {
        let x = letterboxed(photo);
        let raw = yolo.forward(&x).expect("forward");
        let expected = Tensor::read_npz(golden(&format!("{photo}.heads.npz"))).expect("heads");
        for (i, (head, raw)) in heads.iter().zip(&raw).enumerate() {
            let rows = yolo
                .decode(head, raw)
                .expect("decode")
                .squeeze(0)
                .expect("one image");
            let name = format!("head{i}");
            let (_, want) = expected
                .iter()
                .find(|(n, _)| *n == name)
                .expect("golden head");
            assert_eq!(rows.dims(), want.dims(), "{photo} {name}");
            let diff = max_abs_difference(&rows, want);
            eprintln!("{photo} {name}: max abs difference {diff:.1e}");
            assert!(diff <= 1e-3, "{photo} {name}: max abs difference {diff}");
        }
    }
}

#[test]
fn a_batch_gives_each_image_its_own_heads() {
    let yolo = yolov3_tiny();
    let head = yolo.heads().next().cloned().expect("a head");
    let (a, b) = (letterboxed("camera"), letterboxed("coffee"));
    let batch = Tensor::cat(&[&a, &b], 0).expect("batch");
    let together = yolo
        .decode(&head, &yolo.forward(&batch).expect("forward")[0])
        .expect("decode");
    for (i, single) in [a, b].iter().enumerate() {
        let alone = yolo
            .decode(&head, &yolo.forward(single).expect("forward")[0])
            .expect("decode");
        let diff = max_abs_difference(&together.narrow(0, i, 1).expect("row"), &alone);
        assert!(diff <= 1e-5, "image {i}: {diff}");
    }
}

// The mask trap: with the cfg's own mask (0,1,2) the second head's boxes take the wrong anchors, and the comparison
// above would fail.
#[test]
fn the_published_mask_of_the_second_head_does_not_match_the_weights() {
    let text = std::fs::read_to_string(darknet_file("yolov3-tiny.cfg")).expect("cfg");
    let network = Network::parse(&text).expect("parse");
    let bytes = std::fs::read(darknet_file("yolov3-tiny.weights")).expect("weights");
    let weights = network.read_weights(&bytes).expect("read weights");
    let yolo = Yolo::new(network, weights, &Device::Cpu).expect("build");
    let head = yolo.heads().nth(1).cloned().expect("second head");
    assert_eq!(head.mask, [0, 1, 2]);
    let x = letterboxed("coffee");
    let rows = yolo
        .decode(&head, &yolo.forward(&x).expect("forward")[1])
        .and_then(|t| t.squeeze(0))
        .expect("decode");
    let expected = Tensor::read_npz(golden("coffee.heads.npz")).expect("heads");
    let (_, want) = expected.iter().find(|(n, _)| n == "head1").expect("head1");
    assert!(max_abs_difference(&rows, want) > 1e-2);
}

/// A reference detection of `detections.json`: class, score, box in the original photo's pixels.
struct Expected {
    class: usize,
    score: f32,
    bbox: [f32; 4],
}

/// The reference detections of a photo, and its width and height.
fn expected_detections(photo: &str) -> (f32, f32, Vec<Expected>) {
    let text = std::fs::read_to_string(golden("detections.json")).expect("detections.json");
    let all: serde_json::Value = serde_json::from_str(&text).expect("json");
    let entry = &all[format!("{photo}.png")];
    let number = |v: &serde_json::Value| v.as_f64().expect("number") as f32;
    let detections = entry["detections"]
        .as_array()
        .expect("detections")
        .iter()
        .map(|d| Expected {
            class: d["class"].as_u64().expect("class") as usize,
            score: number(&d["score"]),
            bbox: std::array::from_fn(|i| number(&d["box"][i])),
        })
        .collect();
    (
        number(&entry["width"]),
        number(&entry["height"]),
        detections,
    )
}

// The whole detector, decoding and selection included, against the reference's final detections at a score of
// 0.25 and IoU 0.45: the boxes are mapped back through the reference's letterbox to the photo's pixels.
#[test]
fn final_detections_match_the_reference() {
    use model_server::detections::{Selection, iou};
    let yolo = yolov3_tiny();
    let mut total = 0;
    for photo in PHOTOS {
        let (width, height, expected) = expected_detections(photo);
        let found = yolo
            .detect(&letterboxed(photo), &[Selection::default()])
            .expect("detect")
            .remove(0);
        let scale = (416.0 / width).min(416.0 / height);
        let (dx, dy) = (
            ((416.0 - (width * scale).round().max(1.0)) / 2.0).floor(),
            ((416.0 - (height * scale).round().max(1.0)) / 2.0).floor(),
        );
        let classes = |d: &[(usize, f32)]| d.iter().map(|(c, _)| *c).collect::<Vec<_>>();
        let ours: Vec<(usize, f32)> = found.iter().map(|d| (d.class, d.score)).collect();
        let theirs: Vec<(usize, f32)> = expected.iter().map(|d| (d.class, d.score)).collect();
        assert_eq!(
            classes(&ours),
            classes(&theirs),
            "{photo}: {ours:?} vs {theirs:?}"
        );
        for (d, e) in found.iter().zip(&expected) {
            let [x1, y1, x2, y2] = d.bbox;
            let mapped = [
                ((x1 - dx) / scale).clamp(0.0, width),
                ((y1 - dy) / scale).clamp(0.0, height),
                ((x2 - dx) / scale).clamp(0.0, width),
                ((y2 - dy) / scale).clamp(0.0, height),
            ];
            let overlap = iou(&mapped, &e.bbox);
            assert!(
                overlap >= 0.99,
                "{photo}: IoU {overlap} of {mapped:?} and {:?}",
                e.bbox
            );
            assert!(
                (d.score - e.score).abs() <= 1e-3,
                "{photo}: score {} vs {}",
                d.score,
                e.score
            );
            total += 1;
        }
    }
    // camera: two people; coffee: a cup; motorcycle_left: a motorbike; clock_motion: a vase.
    assert_eq!(total, 5);
}

// The CPU runs the network channels-last on the project's GEMM; other devices run candle's own operations. Both
// must give the same heads.
#[test]
fn candles_generic_operations_give_the_same_heads() {
    let fast = yolov3_tiny();
    let generic = yolov3_tiny_with(Yolo::with_candle_ops);
    let x =
        Tensor::cat(&[letterboxed("motorcycle_left"), letterboxed("camera")], 0).expect("batch");
    let (a, b) = (
        fast.forward(&x).expect("forward"),
        generic.forward(&x).expect("forward"),
    );
    assert_eq!(a.len(), 2);
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.dims(), b.dims());
        let diff = max_abs_difference(a, b);
        assert!(diff <= 1e-3, "head {i}: raw outputs differ by {diff}");
    }
}

// The converter writes the network into a repository version (safetensors + the corrected cfg); the server loads
// that version into exactly the detector the darknet files make, and refuses a version whose tensors do not fit.
#[test]
fn a_converted_repository_version_is_the_same_detector_and_a_broken_one_is_refused() {
    use model_server::backend::{self, Outputs};
    use model_server::detections::Selection;
    use model_server::repository;
    use model_server::repository_setup::{
        DarknetSpec, YOLOV3_TINY_SHA256, make_darknet_repository,
    };

    let out = std::env::temp_dir().join(format!("yolo-repository-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let spec = DarknetSpec {
        cfg: darknet_file("yolov3-tiny.cfg"),
        weights: darknet_file("yolov3-tiny.weights"),
        sha256: YOLOV3_TINY_SHA256.into(),
        labels: darknet_file("coco.names"),
        out: out.clone(),
        model_name: "yolov3-tiny".into(),
        version: 1,
    };
    let summary = make_darknet_repository(&spec).expect("convert");
    println!("{summary}");
    assert_eq!(
        (summary.parameters, summary.labels),
        (8_858_734, 80),
        "{summary}"
    );
    assert!(summary.note.is_some(), "the mask correction is reported");
    let dir = out.join("yolov3-tiny/1");
    let config = repository::read_config(&dir).expect("config.json");
    assert_eq!(
        (config.architecture.as_str(), config.num_classes),
        ("yolov3-tiny", 80)
    );
    let written = Network::parse(&std::fs::read_to_string(dir.join("model.cfg")).unwrap()).unwrap();
    let masks: Vec<Vec<usize>> = written
        .layers
        .iter()
        .filter_map(|l| match l {
            darknet::Layer::Yolo(head) => Some(head.mask.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(masks, [vec![3, 4, 5], vec![1, 2, 3]]);

    let loaded = backend::load(&config, &dir, &Device::Cpu, DType::F32).expect("load");
    let x = Tensor::cat(&[letterboxed("camera"), letterboxed("coffee")], 0).unwrap();
    let selections = [Selection::default(); 2];
    let Outputs::Detections(theirs) = loaded.run(&x, &selections).expect("run") else {
        panic!("a detector answers detections");
    };
    let ours = yolov3_tiny().detect(&x, &selections).expect("detect");
    assert_eq!(theirs, ours);
    assert_eq!(ours.iter().map(Vec::len).sum::<usize>(), 3);

    // A wrong checksum is refused before anything is written.
    let wrong = DarknetSpec {
        sha256: "0".repeat(64),
        version: 2,
        ..spec
    };
    let err = make_darknet_repository(&wrong).unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");
    assert!(!out.join("yolov3-tiny/2").exists());

    // A tensor missing from the weights is named.
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    tensors.remove("4.kernel");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = backend::load(&config, &dir, &Device::Cpu, DType::F32)
        .err()
        .expect("a missing tensor is refused");
    assert!(err.to_string().contains("`4.kernel`"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}
