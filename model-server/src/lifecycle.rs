//! What is served and how it changes: the start-up load, the repository poll, and the load and unload calls.
//!
//! Availability comes first, as in TF Serving: a new or changed version is loaded and warmed up beside the one
//! serving, and takes traffic only when it is ready; a version the policy no longer wants is unloaded only once
//! a wanted one serves; a load that fails leaves what serves in place. Each model has its own lock, so loading
//! or unloading one never waits for another, and requests never take it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};

use crate::config::ControlMode;
use crate::error::InferError;
use crate::load::{self, LoadOptions, Source};
use crate::registry::{IndexEntry, Phase, Registry, Slot};
use crate::repository::{self, ConfigOverride, Fingerprint};

/// Why a sync was asked for, which decides how much the files are trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Start-up: the repository is taken as it is.
    Startup,
    /// A poll: a version is taken only when its files are the same as at the previous poll.
    Poll,
    /// A load call: the caller says the files are ready; failed files are tried again.
    Explicit,
}

/// What the lifecycle remembers of one model between syncs.
#[derive(Default)]
struct Track {
    /// Each version's files at the previous scan.
    seen: HashMap<u64, Option<Fingerprint>>,
    /// Files that failed to load, by version: a poll does not try them again until they change.
    failed: HashMap<u64, Option<Fingerprint>>,
    /// The `config` parameter of the last load call.
    config_override: Option<ConfigOverride>,
    /// Why the model-wide config was refused at the last scan, so a poll warns once, not at every scan.
    config_error: Option<String>,
}

/// The control side of the server: owns what the registry holds.
pub struct Lifecycle {
    registry: Arc<Registry>,
    root: PathBuf,
    mode: ControlMode,
    opts: LoadOptions,
    tracks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Track>>>>,
    failures: IntCounterVec,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Lifecycle {
    /// A lifecycle over `registry` for the repository at `root`.
    pub fn new(
        registry: Arc<Registry>,
        root: PathBuf,
        mode: ControlMode,
        opts: LoadOptions,
    ) -> Result<Self, prometheus::Error> {
        let failures = IntCounterVec::new(
            Opts::new(
                "model_load_failures_total",
                "Loads of a model version that failed (the version that served before, if any, still serves)",
            ),
            &["model", "version"],
        )?;
        Ok(Self {
            registry,
            root,
            mode,
            opts,
            tracks: Mutex::new(HashMap::new()),
            failures,
            ready: tokio::sync::watch::channel(false).0,
        })
    }

    /// The registry it manages.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The control mode.
    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    /// The load failure counter, for the metrics registry.
    pub fn failure_counter(&self) -> IntCounterVec {
        self.failures.clone()
    }

    /// Follows the server's readiness as loads and unloads change it.
    pub fn watch_ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn publish_ready(&self) {
        let ready = self.registry.all_ready();
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    fn track(&self, model: &str) -> Arc<tokio::sync::Mutex<Track>> {
        self.tracks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_owned())
            .or_default()
            .clone()
    }

    /// Loads what the mode serves at start-up: every model in `none` and `poll`, the `--load-model` ones in
    /// `explicit`. A model that fails is reported and the others still load.
    pub async fn start(&self, load_models: &[String]) -> Result<(), repository::RepositoryError> {
        let on_disk = repository::model_names(&self.root)?;
        // An empty repository in `none` mode was refused before the server started.
        let names: Vec<String> = match self.mode {
            ControlMode::None | ControlMode::Poll => on_disk,
            ControlMode::Explicit if load_models.iter().any(|m| m == "*") => on_disk,
            ControlMode::Explicit => load_models.to_vec(),
        };
        for name in &names {
            if let Err(e) = self.sync_model(name, Trigger::Startup).await {
                tracing::error!(model = %name, error = %e, "model failed to load at start-up");
            }
        }
        self.registry.set_started();
        self.publish_ready();
        Ok(())
    }

    /// Scans the repository every `interval` and applies what changed, until the task is dropped.
    pub async fn poll(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: the start-up scan has just been made.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let on_disk = match repository::model_names(&self.root) {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot scan the model repository; what serves stays");
                    continue;
                }
            };
            let names: HashSet<String> = on_disk
                .into_iter()
                .chain(self.registry.model_names())
                .collect();
            // Each model on its own task: a slow load of one does not hold up what changes in another.
            let mut syncs = tokio::task::JoinSet::new();
            for name in names {
                let this = self.clone();
                syncs.spawn(async move {
                    if let Err(e) = this.sync_model(&name, Trigger::Poll).await {
                        tracing::debug!(model = %name, error = %e, "poll left the model as it was");
                    }
                });
            }
            while syncs.join_next().await.is_some() {}
        }
    }

    /// `RepositoryModelLoad`: loads or reloads `model` from the repository, with an optional `config` override.
    /// Answers once the versions are ready, or with the reason they are not.
    pub async fn load_model(
        &self,
        model: &str,
        config_override: Option<ConfigOverride>,
    ) -> Result<(), InferError> {
        self.require_explicit()?;
        check_model_name(model)?;
        {
            let track = self.track(model);
            track.lock().await.config_override = config_override;
        }
        let result = self.sync_model(model, Trigger::Explicit).await;
        self.publish_ready();
        result
    }

    /// `RepositoryModelUnload`: stops serving every version of `model`. Requests it already has finish.
    pub async fn unload_model(&self, model: &str) -> Result<(), InferError> {
        self.require_explicit()?;
        check_model_name(model)?;
        let track = self.track(model);
        let mut track = track.lock().await;
        let versions = self.registry.versions(model)?;
        for slot in versions {
            self.registry.remove(model, slot.version);
        }
        *track = Track::default();
        tracing::info!(model, "unloaded; requests already taken finish on it");
        self.publish_ready();
        Ok(())
    }

    fn require_explicit(&self) -> Result<(), InferError> {
        if self.mode == ControlMode::Explicit {
            Ok(())
        } else {
            Err(InferError::ControlDisabled(self.mode.to_string()))
        }
    }

    /// Every version the registry knows, and in `explicit` mode the repository's models that are not loaded.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut entries = self.registry.index();
        if self.mode == ControlMode::Explicit
            && let Ok(names) = repository::model_names(&self.root)
        {
            let known: HashSet<&str> = entries.iter().map(|e| e.model.as_str()).collect();
            let unloaded: Vec<IndexEntry> = names
                .into_iter()
                .filter(|n| !known.contains(n.as_str()))
                .map(|model| IndexEntry {
                    model,
                    version: None,
                    phase: Phase::Unavailable,
                    reason: "not loaded".into(),
                })
                .collect();
            entries.extend(unloaded);
            entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
        }
        entries
    }

    /// Brings one model in line with its directory and version policy.
    async fn sync_model(&self, model: &str, trigger: Trigger) -> Result<(), InferError> {
        let track = self.track(model);
        let mut track = track.lock().await;
        let result = self.sync_locked(model, trigger, &mut track).await;
        drop(track);
        if trigger != Trigger::Startup {
            self.publish_ready();
        }
        result
    }

    async fn sync_locked(
        &self,
        model: &str,
        trigger: Trigger,
        track: &mut Track,
    ) -> Result<(), InferError> {
        let load_failed = |reason: String| InferError::LoadFailed {
            model: model.to_owned(),
            reason,
        };
        let scanned = repository::scan_model(&self.root, model, track.config_override.as_ref())
            .map_err(|e| load_failed(e.to_string()))?;
        let Some(dir) = scanned else {
            // The model's directory is gone: so is the model.
            if let Ok(versions) = self.registry.versions(model) {
                for slot in versions {
                    self.registry.remove(model, slot.version);
                }
                tracing::info!(model, "model directory removed; unloaded");
            }
            *track = Track::default();
            return Err(InferError::ModelNotFound(model.to_owned()));
        };
        let policy = match &dir.config {
            Ok(config) => config.version_policy.clone(),
            Err(reason) => {
                if trigger != Trigger::Poll || track.config_error.as_ref() != Some(reason) {
                    tracing::warn!(model, reason = %reason, "model config is invalid; what serves stays");
                    self.failures.with_label_values(&[model, ""]).inc();
                    track.config_error = Some(reason.clone());
                }
                return Err(load_failed(reason.clone()));
            }
        };
        track.config_error = None;
        let on_disk = dir.numbers();
        let wanted = policy.select(&on_disk);
        let previous = std::mem::replace(
            &mut track.seen,
            dir.versions
                .iter()
                .map(|v| (v.version, v.fingerprint.clone()))
                .collect(),
        );
        let mut errors = Vec::new();
        for v in dir.versions.iter().filter(|v| wanted.contains(&v.version)) {
            let stable =
                trigger != Trigger::Poll || previous.get(&v.version) == Some(&v.fingerprint);
            if v.fingerprint.is_none() || !stable {
                continue;
            }
            let config = repository::read_config_with(&v.dir, track.config_override.as_ref())
                .map_err(|e| e.to_string());
            let existing = self.registry.get(model, v.version);
            let current = existing.as_ref().and_then(|s| s.serving());
            if let (Some(current), Ok(config)) = (&current, &config)
                && current.fingerprint == v.fingerprint
                && current.config == *config
            {
                continue;
            }
            if trigger == Trigger::Poll && track.failed.get(&v.version) == Some(&v.fingerprint) {
                continue;
            }
            let slot =
                existing.unwrap_or_else(|| self.registry.insert(Slot::loading(model, v.version)));
            slot.set_reloading();
            let loaded = match config {
                Ok(config) => {
                    let source = Source {
                        model,
                        version: v.version,
                        dir: &v.dir,
                        config,
                        fingerprint: v.fingerprint.clone(),
                    };
                    load::load(source, &self.opts)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(reason) => Err(reason),
            };
            match loaded {
                Ok(loaded) => {
                    let replaced = current.is_some();
                    slot.set_ready(Arc::new(loaded));
                    track.failed.remove(&v.version);
                    tracing::info!(model, version = v.version, replaced, "version serving");
                }
                Err(reason) => {
                    tracing::warn!(
                        model,
                        version = v.version,
                        still_serving = current.is_some(),
                        reason = %reason,
                        "version failed to load"
                    );
                    self.failures
                        .with_label_values(&[model, &v.version.to_string()])
                        .inc();
                    slot.set_failed(reason.clone());
                    track.failed.insert(v.version, v.fingerprint.clone());
                    errors.push(format!("version {}: {reason}", v.version));
                }
            }
        }
        // Versions the policy no longer wants go once a wanted one serves; versions whose directory is gone go
        // at once, and so do ones that never served.
        let wanted_serves = wanted.iter().any(|v| {
            self.registry
                .get(model, *v)
                .is_some_and(|s| s.serving().is_some())
        });
        for slot in self.registry.versions(model).unwrap_or_default() {
            if wanted.contains(&slot.version) && on_disk.contains(&slot.version) {
                continue;
            }
            let gone = !on_disk.contains(&slot.version);
            if gone || wanted_serves || slot.serving().is_none() {
                self.registry.remove(model, slot.version);
                track.failed.remove(&slot.version);
                tracing::info!(
                    model,
                    version = slot.version,
                    reason = if gone {
                        "directory removed"
                    } else {
                        "not in the version policy"
                    },
                    "unloading; requests already taken finish on it"
                );
            }
        }
        if trigger == Trigger::Explicit {
            if !errors.is_empty() {
                return Err(load_failed(errors.join("; ")));
            }
            if wanted.is_empty() {
                return Err(load_failed(format!(
                    "no version to load: versions on disk {on_disk:?}, version policy {policy:?}"
                )));
            }
        } else if !errors.is_empty() {
            return Err(load_failed(errors.join("; ")));
        }
        Ok(())
    }
}

/// A model name is one directory of the repository, never a path out of it.
fn check_model_name(model: &str) -> Result<(), InferError> {
    let ok = !model.is_empty()
        && !model.starts_with('.')
        && !model.contains(['/', '\\', '\0'])
        && model.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(InferError::InvalidArgument(format!(
            "`{model}` is not a model name: a model is one directory of the repository (no `/`, not starting with `.`)"
        )))
    }
}
