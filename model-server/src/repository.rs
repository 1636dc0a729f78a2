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

/// Which input tensor a classifier takes. One per model name, as Triton's clients (perf_analyzer above all)
/// fill every input the metadata lists; serving both layouts takes two model names over the same weights.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// `pixels`: raw RGB, UINT8 `[N, H, W, 3]`; the server normalises.
    #[default]
    Pixels,
    /// `input`: already normalised, FP32 `[N, 3, H, W]`.
    Normalised,
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VersionConfig {
    /// Network architecture, e.g. `efficientnet-lite0`.
    pub architecture: String,
    /// Weights file, relative to the version directory.
    pub weights: PathBuf,
    /// The network's description, relative to the version directory, for architectures read from one
    /// (a darknet cfg for `yolov3-tiny`).
    #[serde(default)]
    pub network: Option<PathBuf>,
    /// Labels file (one per line, in class order), relative to the version directory.
    pub labels: PathBuf,
    pub num_classes: usize,
    pub input: InputSize,
    /// The input tensor requests carry; a detector takes pixels only.
    #[serde(default)]
    pub input_format: InputFormat,
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

/// `version_policy` of a model's `config.json`, as Triton's: which of the versions on disk are served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The `num_versions` highest versions.
    Latest { num_versions: usize },
    /// Every version.
    All {},
    /// These versions, where they exist.
    Specific { versions: Vec<u64> },
}

impl Default for VersionPolicy {
    fn default() -> Self {
        Self::Latest { num_versions: 1 }
    }
}

impl VersionPolicy {
    /// The versions of `available` (ascending) this policy serves.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            Self::Latest { num_versions } => {
                available[available.len().saturating_sub(*num_versions)..].to_vec()
            }
            Self::All {} => available.to_vec(),
            Self::Specific { versions } => available
                .iter()
                .copied()
                .filter(|v| versions.contains(v))
                .collect(),
        }
    }
}

/// The optional model-wide `<model>/config.json`: settings that span the model's versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub version_policy: VersionPolicy,
}

/// A `config` load parameter: a JSON object over the model's configuration. Its `version_policy` replaces the
/// model's; every other field replaces that field of each version's `config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigOverride {
    model: serde_json::Map<String, serde_json::Value>,
    version: serde_json::Map<String, serde_json::Value>,
}

impl ConfigOverride {
    /// Parses the parameter's JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("the `config` parameter is not valid JSON: {e}"))?;
        let serde_json::Value::Object(fields) = value else {
            return Err("the `config` parameter must be a JSON object".into());
        };
        let (model, version) = fields
            .into_iter()
            .partition(|(key, _)| key == "version_policy");
        Ok(Self { model, version })
    }
}

/// What one size and modification time say of a version directory's files: when it is the same in two scans,
/// nothing was written in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>);

impl Fingerprint {
    /// Walks `dir` (subdirectories too, symbolic links followed).
    pub fn of(dir: &Path) -> Result<Self, RepositoryError> {
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            let io = |source| RepositoryError::Io {
                path: d.clone(),
                source,
            };
            for entry in std::fs::read_dir(&d).map_err(io)? {
                let path = entry.map_err(io)?.path();
                let meta = std::fs::metadata(&path).map_err(|source| RepositoryError::Io {
                    path: path.clone(),
                    source,
                })?;
                if meta.is_dir() {
                    pending.push(path);
                } else {
                    let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                    files.push((relative, meta.len(), meta.modified().ok()));
                }
            }
        }
        files.sort();
        Ok(Self(files))
    }
}

/// One `<model>/<version>` directory as found on disk.
#[derive(Debug, Clone)]
pub struct VersionDir {
    pub version: u64,
    pub dir: PathBuf,
    /// `None` when the directory could not be read (it went while being walked, say).
    pub fingerprint: Option<Fingerprint>,
}

/// One model directory: its model-wide config and its version directories, ascending.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub config: Result<ModelConfig, String>,
    pub versions: Vec<VersionDir>,
}

impl ModelDir {
    /// The version numbers on disk, ascending.
    pub fn numbers(&self) -> Vec<u64> {
        self.versions.iter().map(|v| v.version).collect()
    }
}

/// Checks that `root` is a repository directory.
pub fn check_root(root: &Path) -> Result<(), RepositoryError> {
    if root.is_dir() {
        Ok(())
    } else {
        Err(RepositoryError::Missing(root.to_path_buf()))
    }
}

/// The model names under `root`, sorted.
pub fn model_names(root: &Path) -> Result<Vec<String>, RepositoryError> {
    check_root(root)?;
    let mut names: Vec<String> = read_dirs(root)?
        .iter()
        .filter_map(|d| d.file_name()?.to_str().map(str::to_owned))
        // A hidden directory is where a model is prepared before it is renamed into place.
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Reads `<root>/<model>`: `None` when the model's directory is not there.
pub fn scan_model(
    root: &Path,
    model: &str,
    config_override: Option<&ConfigOverride>,
) -> Result<Option<ModelDir>, RepositoryError> {
    let model_dir = root.join(model);
    if !model_dir.is_dir() {
        return Ok(None);
    }
    let mut versions = Vec::new();
    for version_dir in read_dirs(&model_dir)? {
        // Triton's convention: version directories are positive integers; anything else (a temporary name a
        // version is copied under before it is renamed into place, say) is not a version.
        let Some(version) = version_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|v| *v > 0)
        else {
            continue;
        };
        versions.push(VersionDir {
            version,
            fingerprint: Fingerprint::of(&version_dir).ok(),
            dir: version_dir,
        });
    }
    versions.sort_by_key(|v| v.version);
    let config = read_model_config(&model_dir, config_override).map_err(|e| e.to_string());
    Ok(Some(ModelDir { config, versions }))
}

/// Reads the optional `<model>/config.json`, with an override's `version_policy` over it.
fn read_model_config(
    model_dir: &Path,
    config_override: Option<&ConfigOverride>,
) -> Result<ModelConfig, RepositoryError> {
    let path = model_dir.join(CONFIG_FILE);
    let mut fields = if path.is_file() {
        match read_json(&path)? {
            serde_json::Value::Object(fields) => fields,
            _ => {
                return Err(RepositoryError::Invalid {
                    path,
                    reason: "must be a JSON object".into(),
                });
            }
        }
    } else {
        serde_json::Map::new()
    };
    if let Some(o) = config_override {
        fields.extend(o.model.clone());
    }
    // serde's own message names the bad variant but not the field it is in.
    if let Some(policy) = fields.get("version_policy") {
        VersionPolicy::deserialize(policy).map_err(|e| RepositoryError::Invalid {
            path: path.clone(),
            reason: format!("version_policy: {e}"),
        })?;
    }
    let config: ModelConfig =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|source| {
            RepositoryError::Config {
                path: path.clone(),
                source,
            }
        })?;
    if config.version_policy == (VersionPolicy::Latest { num_versions: 0 }) {
        return Err(RepositoryError::Invalid {
            path,
            reason: "version_policy.latest.num_versions must be at least 1".into(),
        });
    }
    Ok(config)
}

fn read_json(path: &Path) -> Result<serde_json::Value, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RepositoryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| RepositoryError::Config {
        path: path.to_path_buf(),
        source,
    })
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
    read_config_with(dir, None)
}

/// Reads and checks `config.json` in a version directory, with a load call's override over it.
pub fn read_config_with(
    dir: &Path,
    config_override: Option<&ConfigOverride>,
) -> Result<VersionConfig, RepositoryError> {
    let path = dir.join(CONFIG_FILE);
    let mut value = read_json(&path)?;
    if let (Some(o), serde_json::Value::Object(fields)) = (config_override, &mut value) {
        fields.extend(o.version.clone());
    }
    let config: VersionConfig =
        serde_json::from_value(value).map_err(|source| RepositoryError::Config {
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
    fn scan_model_lists_numeric_versions_sorted_with_their_files() {
        let root = temp_repo("scan");
        for (model, version, body) in [
            ("m", "2", config_json(10)),
            ("m", "10", config_json(10)),
            ("m", "1", config_json(10)),
            ("m", "tmp", config_json(10)),
            ("m", "+3", config_json(10)),
            ("m", "0", config_json(10)),
            ("broken", "1", "{not json".to_owned()),
            (".staging", "1", config_json(10)),
        ] {
            let dir = root.join(model).join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), body).unwrap();
        }
        assert_eq!(model_names(&root).unwrap(), ["broken", "m"]);
        let m = scan_model(&root, "m", None).unwrap().unwrap();
        assert_eq!(m.numbers(), [1, 2, 10]);
        assert_eq!(m.config, Ok(ModelConfig::default()));
        let files = m.versions[0].fingerprint.as_ref().unwrap();
        assert_eq!(files.0.len(), 1);
        assert_eq!(files.0[0].0, PathBuf::from(CONFIG_FILE));
        // A broken version config is found by the load, not by the scan.
        let broken = scan_model(&root, "broken", None).unwrap().unwrap();
        assert_eq!(broken.numbers(), [1]);
        assert!(
            read_config(&broken.versions[0].dir)
                .unwrap_err()
                .to_string()
                .contains("not a valid model config")
        );
        assert!(scan_model(&root, "absent", None).unwrap().is_none());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn model_names_refuses_a_missing_repository() {
        let root = temp_repo("empty");
        assert!(model_names(&root).unwrap().is_empty());
        assert!(matches!(
            model_names(&root.join("nope")),
            Err(RepositoryError::Missing(_))
        ));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_fingerprint_changes_when_a_file_grows_or_appears() {
        let root = temp_repo("fingerprint");
        std::fs::write(root.join("a"), b"12").unwrap();
        let before = Fingerprint::of(&root).unwrap();
        assert_eq!(Fingerprint::of(&root).unwrap(), before);
        std::fs::write(root.join("a"), b"123").unwrap();
        let grown = Fingerprint::of(&root).unwrap();
        assert_ne!(grown, before);
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b"), b"").unwrap();
        assert_ne!(Fingerprint::of(&root).unwrap(), grown);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn version_policies_select_as_triton_s() {
        let on_disk = [1, 2, 5, 9];
        let latest = |n| VersionPolicy::Latest { num_versions: n };
        assert_eq!(VersionPolicy::default(), latest(1));
        assert_eq!(latest(1).select(&on_disk), [9]);
        assert_eq!(latest(2).select(&on_disk), [5, 9]);
        assert_eq!(latest(10).select(&on_disk), on_disk);
        assert_eq!(VersionPolicy::All {}.select(&on_disk), on_disk);
        let specific = VersionPolicy::Specific {
            versions: vec![2, 3, 9],
        };
        assert_eq!(specific.select(&on_disk), [2, 9]);
        assert!(latest(1).select(&[]).is_empty());
        for (json, expected) in [
            (r#"{"latest": {"num_versions": 2}}"#, latest(2)),
            (r#"{"all": {}}"#, VersionPolicy::All {}),
            (
                r#"{"specific": {"versions": [1, 3]}}"#,
                VersionPolicy::Specific {
                    versions: vec![1, 3],
                },
            ),
        ] {
            assert_eq!(
                serde_json::from_str::<VersionPolicy>(json).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn the_model_config_holds_the_policy_and_an_override_replaces_it() {
        let root = temp_repo("model-config");
        let model = root.join("m");
        std::fs::create_dir_all(model.join("1")).unwrap();
        std::fs::write(model.join("1").join(CONFIG_FILE), config_json(10)).unwrap();
        std::fs::write(
            model.join(CONFIG_FILE),
            r#"{"version_policy": {"all": {}}}"#,
        )
        .unwrap();
        let scanned = scan_model(&root, "m", None).unwrap().unwrap();
        assert_eq!(
            scanned.config.unwrap().version_policy,
            VersionPolicy::All {}
        );

        let o = ConfigOverride::parse(
            r#"{"version_policy": {"specific": {"versions": [1]}}, "num_classes": 3}"#,
        )
        .unwrap();
        let scanned = scan_model(&root, "m", Some(&o)).unwrap().unwrap();
        assert_eq!(
            scanned.config.unwrap().version_policy,
            VersionPolicy::Specific { versions: vec![1] }
        );
        let version = read_config_with(&model.join("1"), Some(&o)).unwrap();
        assert_eq!(version.num_classes, 3);
        assert_eq!(read_config(&model.join("1")).unwrap().num_classes, 10);

        // Checked after the override, as if it were the file.
        let zero = ConfigOverride::parse(r#"{"num_classes": 0}"#).unwrap();
        assert!(
            read_config_with(&model.join("1"), Some(&zero))
                .unwrap_err()
                .to_string()
                .contains("num_classes must be positive")
        );
        let no_versions =
            ConfigOverride::parse(r#"{"version_policy": {"latest": {"num_versions": 0}}}"#)
                .unwrap();
        assert!(
            scan_model(&root, "m", Some(&no_versions))
                .unwrap()
                .unwrap()
                .config
                .unwrap_err()
                .contains("at least 1")
        );
        std::fs::write(
            model.join(CONFIG_FILE),
            r#"{"version_policy": {"newest": {}}}"#,
        )
        .unwrap();
        let refused = scan_model(&root, "m", None)
            .unwrap()
            .unwrap()
            .config
            .unwrap_err();
        assert!(
            refused.contains("version_policy: unknown variant `newest`"),
            "{refused}"
        );
        for bad in ["[1]", "{", "\"x\""] {
            assert!(ConfigOverride::parse(bad).is_err(), "{bad}");
        }
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
