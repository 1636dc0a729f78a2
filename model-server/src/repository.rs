//! The model repository on disk: `<root>/<model>/<version>/` with
//! `config.json`, the weights and the labels, as in Triton's layout.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::MAX_INSTANCES;

/// Name of the per-version configuration file.
pub const CONFIG_FILE: &str = "config.json";

/// Errors reading the repository or one version in it.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error(
        "model repository `{0}` does not exist or is not a directory (create it with scripts/setup-model-repository.sh)"
    )]
    Missing(PathBuf),
    #[error(
        "model repository `{0}` holds no model versions (expected <model>/<version>/config.json)"
    )]
    Empty(PathBuf),
    #[error("reading `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid model config: {source}")]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("`{path}`: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Input geometry the network expects, without the batch dimension.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct InputSize {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// How raw 0..255 pixels become network input: `(x - mean) / std`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct Normalisation {
    pub mean: f32,
    pub std: f32,
}

/// `instance_group` of a version's `config.json`, after Triton's: how many copies of the execution context
/// run this version side by side.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
// A misspelt `count`, or Triton's `kind`, which the server's `--device` decides, is refused rather than ignored.
#[serde(deny_unknown_fields)]
pub struct InstanceGroup {
    pub count: usize,
}

/// `config.json` of one model version.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionConfig {
    /// Network architecture, e.g. `efficientnet-lite0`.
    pub architecture: String,
    /// Weights file, relative to the version directory.
    pub weights: PathBuf,
    /// Labels file (one per line, in class order), relative to the version directory.
    pub labels: PathBuf,
    pub num_classes: usize,
    pub input: InputSize,
    pub normalisation: Normalisation,
    /// The preprocessing recipe clients should apply; informational here.
    #[serde(default)]
    pub preprocessing: serde_json::Value,
    /// Instances of this version; overrides `--instances` when present.
    #[serde(default)]
    pub instance_group: Option<InstanceGroup>,
}

impl VersionConfig {
    /// Instances to run: the version's own `instance_group.count`, or `default` (`--instances`).
    pub fn instances(&self, default: usize) -> usize {
        self.instance_group.map_or(default, |g| g.count)
    }
}

/// One `<model>/<version>` directory, with its config read and checked.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    pub model: String,
    pub version: u64,
    pub dir: PathBuf,
    pub config: Result<VersionConfig, String>,
}

impl VersionEntry {
    /// Path of the weights file.
    pub fn weights_path(&self, config: &VersionConfig) -> PathBuf {
        self.dir.join(&config.weights)
    }
}

/// Lists every model version under `root`, sorted by model then version.
/// A version whose config is unreadable is listed with the reason, so the
/// server can report it instead of silently skipping it.
pub fn scan(root: &Path) -> Result<Vec<VersionEntry>, RepositoryError> {
    if !root.is_dir() {
        return Err(RepositoryError::Missing(root.to_path_buf()));
    }
    let mut entries = Vec::new();
    for model_dir in read_dirs(root)? {
        let Some(model) = model_dir
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        for version_dir in read_dirs(&model_dir)? {
            // Triton's convention: version directories are positive integers;
            // anything else (e.g. a temporary directory) is not a version.
            let Some(version) = version_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|v| *v > 0)
            else {
                continue;
            };
            let config = read_config(&version_dir).map_err(|e| e.to_string());
            entries.push(VersionEntry {
                model: model.clone(),
                version,
                dir: version_dir,
                config,
            });
        }
    }
    if entries.is_empty() {
        return Err(RepositoryError::Empty(root.to_path_buf()));
    }
    entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok(entries)
}

fn read_dirs(dir: &Path) -> Result<Vec<PathBuf>, RepositoryError> {
    let io = |source| RepositoryError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    Ok(dirs)
}

/// Reads and checks `config.json` in a version directory.
pub fn read_config(dir: &Path) -> Result<VersionConfig, RepositoryError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| RepositoryError::Io {
        path: path.clone(),
        source,
    })?;
    let config: VersionConfig =
        serde_json::from_str(&text).map_err(|source| RepositoryError::Config {
            path: path.clone(),
            source,
        })?;
    let invalid = |reason: String| RepositoryError::Invalid {
        path: path.clone(),
        reason,
    };
    if config.num_classes == 0 {
        return Err(invalid("num_classes must be positive".into()));
    }
    let InputSize {
        height,
        width,
        channels,
    } = config.input;
    if height == 0 || width == 0 || channels != 3 {
        return Err(invalid(format!(
            "input must be a positive size with 3 channels, got {height}x{width}x{channels}"
        )));
    }
    let Normalisation { mean, std } = config.normalisation;
    if !mean.is_finite() || !std.is_finite() || std == 0.0 {
        return Err(invalid(
            "normalisation needs a finite mean and a finite non-zero std".into(),
        ));
    }
    if let Some(InstanceGroup { count }) = config.instance_group
        && !(1..=MAX_INSTANCES).contains(&count)
    {
        return Err(invalid(format!(
            "instance_group.count must be between 1 and {MAX_INSTANCES}, got {count}"
        )));
    }
    Ok(config)
}

/// Reads a labels file: one label per line, exactly `num_classes` of them.
pub fn read_labels(path: &Path, num_classes: usize) -> Result<Vec<String>, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RepositoryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_owned()).collect();
    if labels.len() != num_classes || labels.iter().any(String::is_empty) {
        return Err(RepositoryError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "expected {num_classes} non-empty labels, one per line; found {} lines",
                labels.len()
            ),
        });
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_json(classes: usize) -> String {
        config_json_with(classes, "")
    }

    /// A valid config with `extra` (`"key": value, `) added to its fields.
    fn config_json_with(classes: usize, extra: &str) -> String {
        format!(
            r#"{{{extra}"architecture": "efficientnet-lite0", "weights": "model.safetensors",
                "labels": "labels.txt", "num_classes": {classes},
                "input": {{"height": 224, "width": 224, "channels": 3}},
                "normalisation": {{"mean": 127.0, "std": 128.0}}}}"#
        )
    }

    /// Writes `body` as a version's config.json and reads it back.
    fn read(name: &str, body: &str) -> Result<VersionConfig, RepositoryError> {
        let root = temp_repo(name);
        std::fs::write(root.join(CONFIG_FILE), body).unwrap();
        let config = read_config(&root);
        std::fs::remove_dir_all(root).unwrap();
        config
    }

    fn temp_repo(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("repo-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn scan_lists_numeric_versions_sorted_and_keeps_broken_ones() {
        let root = temp_repo("scan");
        for (model, version, body) in [
            ("m", "2", config_json(10)),
            ("m", "1", config_json(10)),
            ("m", "tmp", config_json(10)),
            ("broken", "1", "{not json".to_owned()),
        ] {
            let dir = root.join(model).join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), body).unwrap();
        }
        let entries = scan(&root).unwrap();
        let names: Vec<_> = entries
            .iter()
            .map(|e| (e.model.as_str(), e.version))
            .collect();
        assert_eq!(names, [("broken", 1), ("m", 1), ("m", 2)]);
        assert!(
            entries[0]
                .config
                .as_ref()
                .unwrap_err()
                .contains("not a valid model config")
        );
        assert_eq!(entries[2].config.as_ref().unwrap().num_classes, 10);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn scan_refuses_missing_and_empty_repositories() {
        let root = temp_repo("empty");
        assert!(matches!(scan(&root), Err(RepositoryError::Empty(_))));
        assert!(matches!(
            scan(&root.join("nope")),
            Err(RepositoryError::Missing(_))
        ));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn instance_group_is_optional_and_overrides_the_flag() {
        let plain = read("instances-none", &config_json(10)).unwrap();
        assert_eq!(plain.instance_group, None);
        assert_eq!(plain.instances(3), 3);
        let two = read(
            "instances-two",
            &config_json_with(10, r#""instance_group": {"count": 2}, "#),
        )
        .unwrap();
        assert_eq!(two.instance_group, Some(InstanceGroup { count: 2 }));
        assert_eq!(two.instances(3), 2);
    }

    #[test]
    fn instance_group_count_is_checked() {
        for (name, group, expected) in [
            (
                "zero",
                r#"{"count": 0}"#,
                "instance_group.count must be between 1 and 64, got 0",
            ),
            (
                "huge",
                r#"{"count": 65}"#,
                "instance_group.count must be between 1 and 64, got 65",
            ),
            ("negative", r#"{"count": -1}"#, "not a valid model config"),
            ("missing", r#"{}"#, "missing field `count`"),
            (
                "kind",
                r#"{"count": 1, "kind": "KIND_GPU"}"#,
                "unknown field `kind`",
            ),
            ("array", r#"[{"count": 2}]"#, "not a valid model config"),
        ] {
            let body = config_json_with(10, &format!(r#""instance_group": {group}, "#));
            let e = read(&format!("instances-{name}"), &body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{name}: {e}");
        }
    }

    #[test]
    fn labels_must_match_the_class_count() {
        let root = temp_repo("labels");
        let path = root.join("labels.txt");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(read_labels(&path, 3).unwrap(), ["a", "b", "c"]);
        assert!(
            read_labels(&path, 4)
                .unwrap_err()
                .to_string()
                .contains("expected 4")
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
