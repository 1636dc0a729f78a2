//! The gateway's 224x224 pixels against the golden inputs of the reference implementation.

use std::path::PathBuf;

use gateway::decode::decode;
use gateway::preprocess::{Recipe, preprocess};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/golden")
        .join(name)
}

/// Reads a uint8 `.npy` file of shape (224, 224, 3), checking the header says so.
fn read_pixels_npy(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(golden(name)).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name} is not a .npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '|u1'"), "{name}: {header}");
    assert!(
        header.contains("'fortran_order': False"),
        "{name}: {header}"
    );
    assert!(
        header.contains("'shape': (224, 224, 3)"),
        "{name}: {header}"
    );
    let data = bytes[start + header_len..].to_vec();
    assert_eq!(data.len(), 224 * 224 * 3);
    data
}

#[test]
fn pixels_match_the_golden_inputs() {
    let mut worst_mean: f64 = 0.0;
    for name in ["chelsea", "coffee", "rocket", "camera"] {
        let png = std::fs::read(golden(&format!("{name}.png"))).unwrap();
        let image = decode(&png, 100_000_000).unwrap();
        let ours = preprocess(&image, Recipe::default(), 224, 224).unwrap();
        let theirs = read_pixels_npy(&format!("{name}.pixels.npy"));
        let diffs: Vec<u8> = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().copied().max().unwrap_or(0);
        let exact = diffs.iter().filter(|&&d| d == 0).count() as f64 / diffs.len() as f64;
        println!(
            "{name:8} {}x{}: mean abs diff {mean:.4}, max diff {max}, identical {:.1} %",
            image.width(),
            image.height(),
            exact * 100.0
        );
        assert!(mean <= 1.0, "{name}: mean abs diff {mean} > 1.0");
        worst_mean = worst_mean.max(mean);
    }
    println!("worst mean abs diff {worst_mean:.4}");
}
