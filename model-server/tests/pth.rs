//! Reads the real EfficientNet-Lite0 checkpoint. Expected values come from an independent
//! numpy reader of the same file (`torchpth.py` in the reference material).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, IndexOp, Tensor};
use model_server::convert::pth::read_legacy_pth;

/// The checkpoint, read once for all tests.
fn checkpoint() -> &'static [(String, Tensor)] {
    static TENSORS: OnceLock<Vec<(String, Tensor)>> = OnceLock::new();
    TENSORS.get_or_init(read_checkpoint)
}

/// `EFFICIENTNET_PTH`, else the copy `scripts/setup-model-repository.sh` keeps in `.cache/`.
fn read_checkpoint() -> Vec<(String, Tensor)> {
    let path = std::env::var_os("EFFICIENTNET_PTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache/efficientnet-lite0-57934424.pth")
        });
    assert!(
        path.is_file(),
        "{} not found: run scripts/setup-model-repository.sh (or set EFFICIENTNET_PTH)",
        path.display()
    );
    read_legacy_pth(&path).unwrap_or_else(|e| panic!("reading {}: {e:?}", path.display()))
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no tensor `{name}`"))
}

fn value(tensor: &Tensor, index: [usize; 4]) -> f32 {
    let [a, b, c, d] = index;
    tensor
        .i((a, b, c, d))
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap()
}

#[test]
fn reads_every_tensor_in_file_order() {
    let tensors = checkpoint();
    assert_eq!(tensors.len(), 296);
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..3],
        ["_conv_stem.weight", "_bn0.weight", "_bn0.bias"]
    );
    assert_eq!(
        names[293..],
        ["_bn1.num_batches_tracked", "_fc.weight", "_fc.bias"]
    );

    let float32: usize = tensors
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F32)
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(float32, 4_694_024);
    let counters: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| n.ends_with("num_batches_tracked"))
        .collect();
    assert_eq!(counters.len(), 49);
    assert!(
        counters
            .iter()
            .all(|(_, t)| t.dtype() == DType::I64 && t.dims().is_empty())
    );
}

#[test]
fn shapes_match_the_key_list() {
    let tensors = checkpoint();
    let expected: [(&str, &[usize]); 9] = [
        ("_conv_stem.weight", &[32, 3, 3, 3]),
        ("_bn0.running_var", &[32]),
        ("_blocks.0._depthwise_conv.weight", &[32, 1, 3, 3]),
        ("_blocks.0._project_conv.weight", &[16, 32, 1, 1]),
        ("_blocks.3._depthwise_conv.weight", &[144, 1, 5, 5]),
        ("_blocks.15._project_conv.weight", &[320, 1152, 1, 1]),
        ("_conv_head.weight", &[1280, 320, 1, 1]),
        ("_fc.weight", &[1000, 1280]),
        ("_fc.bias", &[1000]),
    ];
    for (name, shape) in expected {
        assert_eq!(get(tensors, name).dims(), shape, "{name}");
    }
    assert!(tensors.iter().all(|(_, t)| t.is_contiguous()));
}

#[test]
fn non_contiguous_storage_is_materialised_in_logical_order() {
    let tensors = checkpoint();
    // Stored with strides (1, 32, 288, 96): output channel fastest, as TensorFlow lays it out.
    let stem = get(tensors, "_conv_stem.weight");
    for (index, expected) in [
        ([0, 0, 0, 0], -1.110_336_1_f32),
        ([0, 0, 0, 1], -1.308_770_4),
        ([0, 1, 0, 0], -2.116_202_4),
        ([1, 0, 0, 0], -0.296_026_83),
        ([5, 1, 2, 0], 0.063_007_71),
        ([17, 2, 1, 1], -0.722_528_3),
        ([31, 2, 2, 2], 2.235_174_2e-8),
    ] {
        assert_eq!(value(stem, index), expected, "_conv_stem.weight{index:?}");
    }
    let sum = stem
        .to_dtype(DType::F64)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f64>());
    assert!((sum.unwrap() - -26.811_376_610_887_237).abs() < 1e-9);

    // Depthwise (strides (1, 1, 720, 144)) and 1x1 (strides (1, 320, 368640, 368640)) layouts.
    let depthwise = get(tensors, "_blocks.3._depthwise_conv.weight");
    assert_eq!(value(depthwise, [1, 0, 2, 3]), -0.112_088_5);
    assert_eq!(value(depthwise, [143, 0, 4, 4]), -0.022_514_611);
    let project = get(tensors, "_blocks.15._project_conv.weight");
    assert_eq!(value(project, [319, 1151, 0, 0]), -0.043_740_96);
    assert_eq!(value(project, [7, 100, 0, 0]), -0.027_341_858);

    let fc = get(tensors, "_fc.weight");
    let fc_value = |r: usize, c: usize| fc.i((r, c)).and_then(|t| t.to_scalar::<f32>()).unwrap();
    assert_eq!(fc_value(0, 0), -0.045_610_435);
    assert_eq!(fc_value(3, 7), -0.047_977_716);
    assert_eq!(fc_value(999, 1279), 0.040_857_97);
}
