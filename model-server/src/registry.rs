//! The model versions this server knows, by name and version, and where each is in its life.
//!
//! A request takes an `Arc` of the version it runs on ([`Loaded`]) for as long as it runs. Replacing or
//! unloading a version only drops the registry's own reference, so the requests already queued or running
//! finish on the version they started on, and its memory goes with the last of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::backend::Kind;
use crate::batcher::Batcher;
use crate::error::InferError;
use crate::repository::{Fingerprint, VersionConfig};
use crate::stats::Stats;

/// A loaded, warmed-up model version.
pub struct Loaded {
    pub batcher: Batcher,
    pub labels: Arc<Vec<String>>,
    /// What it does with an image.
    pub kind: Kind,
    /// The configuration it was loaded with.
    pub config: VersionConfig,
    /// The files it was loaded from, as they were.
    pub fingerprint: Option<Fingerprint>,
}

impl Loaded {
    /// Statistics of this version since it was loaded.
    pub fn stats(&self) -> &Arc<Stats> {
        self.batcher.stats()
    }
}

/// Where a model version is in its life, as RepositoryIndex names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Being loaded for the first time: nothing serves yet.
    Loading,
    /// Serving (possibly while new files for it load beside it).
    Ready,
    /// Failed to load; the reason says why.
    Unavailable,
    /// Removed; the requests it already had are finishing.
    Unloading,
}

impl Phase {
    /// The RepositoryIndex state string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loading => "LOADING",
            Self::Ready => "READY",
            Self::Unavailable => "UNAVAILABLE",
            Self::Unloading => "UNLOADING",
        }
    }
}

struct SlotState {
    phase: Phase,
    serving: Option<Arc<Loaded>>,
    /// Why the version cannot serve, or why its last reload failed while the previous files still serve.
    reason: String,
}

/// One `<model>/<version>` the server serves or tries to.
pub struct Slot {
    pub model: String,
    pub version: u64,
    state: RwLock<SlotState>,
}

impl Slot {
    /// A version about to load for the first time.
    pub fn loading(model: &str, version: u64) -> Self {
        Self {
            model: model.to_owned(),
            version,
            state: RwLock::new(SlotState {
                phase: Phase::Loading,
                serving: None,
                reason: String::new(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SlotState> {
        // Every write leaves the state whole, so a poisoned lock still holds a valid one.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SlotState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The phase and the reason that goes with it.
    pub fn status(&self) -> (Phase, String) {
        let s = self.read();
        (s.phase, s.reason.clone())
    }

    /// The loaded version, if one serves.
    pub fn serving(&self) -> Option<Arc<Loaded>> {
        self.read().serving.clone()
    }

    /// The loaded version, or why it cannot serve.
    pub fn ready(&self) -> Result<Arc<Loaded>, InferError> {
        let s = self.read();
        match (&s.serving, s.phase) {
            (Some(loaded), Phase::Ready) => Ok(loaded.clone()),
            (_, Phase::Loading) => Err(self.not_ready("still loading".into())),
            (_, Phase::Unloading) => Err(self.not_ready("being unloaded".into())),
            _ => Err(self.not_ready(s.reason.clone())),
        }
    }

    /// Serves `loaded` from now on; the version it replaces finishes the requests it has.
    pub fn set_ready(&self, loaded: Arc<Loaded>) {
        let mut s = self.write();
        s.phase = Phase::Ready;
        s.serving = Some(loaded);
        s.reason.clear();
    }

    /// Records a failed load: a version that serves keeps serving, with the reason noted; one that does not
    /// becomes unavailable.
    pub fn set_failed(&self, reason: String) {
        let mut s = self.write();
        if s.serving.is_some() {
            s.reason = format!("the last reload failed, the previous files still serve: {reason}");
        } else {
            s.phase = Phase::Unavailable;
            s.reason = reason;
        }
    }

    /// Notes, for the index, that new files are loading while the current ones serve.
    pub fn set_reloading(&self) {
        let mut s = self.write();
        if s.serving.is_some() {
            s.reason = "new files are loading; the current ones serve until they are ready".into();
        } else {
            s.phase = Phase::Loading;
            s.reason.clear();
        }
    }

    fn not_ready(&self, reason: String) -> InferError {
        InferError::NotReady {
            model: self.model.clone(),
            version: self.version,
            reason,
        }
    }
}

/// A version taken out of the registry whose requests are still finishing.
struct Retiring {
    model: String,
    version: u64,
    loaded: Weak<Loaded>,
}

/// One line of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub model: String,
    /// `None` for a model of the repository that is not loaded at all.
    pub version: Option<u64>,
    pub phase: Phase,
    pub reason: String,
}

type Models = BTreeMap<String, BTreeMap<u64, Arc<Slot>>>;

/// Every model version the server knows.
#[derive(Default)]
pub struct Registry {
    models: RwLock<Models>,
    retiring: Mutex<Vec<Retiring>>,
    /// Set once the start-up loads are done: readiness waits for them.
    started: AtomicBool,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Models> {
        // Inserts and removals are single map operations: a poisoned lock still holds a consistent map.
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Models> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every slot, ordered by model and version.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.read()
            .values()
            .flat_map(BTreeMap::values)
            .cloned()
            .collect()
    }

    /// The names of the models with at least one version.
    pub fn model_names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The versions of one model, oldest first.
    pub fn versions(&self, model: &str) -> Result<Vec<Arc<Slot>>, InferError> {
        self.read()
            .get(model)
            .map(|v| v.values().cloned().collect())
            .ok_or_else(|| InferError::ModelNotFound(model.to_owned()))
    }

    /// The versions of `model` that serve now, ascending.
    pub fn serving_versions(&self, model: &str) -> Vec<u64> {
        self.read().get(model).map_or_else(Vec::new, |versions| {
            versions
                .values()
                .filter(|s| s.serving().is_some())
                .map(|s| s.version)
                .collect()
        })
    }

    /// The slot of one version, if the registry has it.
    pub fn get(&self, model: &str, version: u64) -> Option<Arc<Slot>> {
        self.read().get(model)?.get(&version).cloned()
    }

    /// Finds a model version. An empty version means the highest one that serves, or the highest one
    /// when none serves (whose error then says why).
    pub fn resolve(&self, model: &str, version: &str) -> Result<Arc<Slot>, InferError> {
        let models = self.read();
        let versions = models
            .get(model)
            .ok_or_else(|| InferError::ModelNotFound(model.to_owned()))?;
        let not_found = || InferError::VersionNotFound {
            model: model.to_owned(),
            version: version.to_owned(),
            available: versions
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        if version.is_empty() {
            return versions
                .values()
                .rev()
                .find(|s| s.serving().is_some())
                .or_else(|| versions.values().next_back())
                .cloned()
                .ok_or_else(not_found);
        }
        version
            .parse::<u64>()
            .ok()
            .and_then(|v| versions.get(&v))
            .cloned()
            .ok_or_else(not_found)
    }

    /// Adds a slot, or returns the one already there for that version.
    pub fn insert(&self, slot: Slot) -> Arc<Slot> {
        self.write()
            .entry(slot.model.clone())
            .or_default()
            .entry(slot.version)
            .or_insert_with(|| Arc::new(slot))
            .clone()
    }

    /// Takes a version out: new requests no longer find it, and the ones it has finish on it.
    pub fn remove(&self, model: &str, version: u64) {
        let removed = {
            let mut models = self.write();
            let Some(versions) = models.get_mut(model) else {
                return;
            };
            let removed = versions.remove(&version);
            if versions.is_empty() {
                models.remove(model);
            }
            removed
        };
        let Some(slot) = removed else { return };
        let loaded = {
            let mut s = slot.write();
            s.phase = Phase::Unloading;
            s.serving.take()
        };
        if let Some(loaded) = loaded {
            let mut retiring = self.lock_retiring();
            retiring.retain(|r| r.loaded.strong_count() > 0);
            retiring.push(Retiring {
                model: model.to_owned(),
                version,
                loaded: Arc::downgrade(&loaded),
            });
        }
    }

    fn lock_retiring(&self) -> std::sync::MutexGuard<'_, Vec<Retiring>> {
        self.retiring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Versions taken out whose requests have not all finished yet.
    pub fn unloading(&self) -> Vec<(String, u64)> {
        let mut retiring = self.lock_retiring();
        retiring.retain(|r| r.loaded.strong_count() > 0);
        retiring
            .iter()
            .map(|r| (r.model.clone(), r.version))
            .collect()
    }

    /// Every known version with its phase, the unloading ones included, by model and version.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut entries: Vec<IndexEntry> = self
            .slots()
            .iter()
            .map(|s| {
                let (phase, reason) = s.status();
                IndexEntry {
                    model: s.model.clone(),
                    version: Some(s.version),
                    phase,
                    reason,
                }
            })
            .collect();
        for (model, version) in self.unloading() {
            entries.push(IndexEntry {
                model,
                version: Some(version),
                phase: Phase::Unloading,
                reason: "requests taken before the unload are finishing".into(),
            });
        }
        entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
        entries
    }

    /// Marks the start-up loads as done.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Ready once the start-up loads are done, while every model has a version that serves or one still
    /// loading: a model whose every version failed makes the server unready, as Triton's strict readiness.
    pub fn all_ready(&self) -> bool {
        if !self.started.load(Ordering::SeqCst) {
            return false;
        }
        self.read().values().all(|versions| {
            versions.values().any(|s| {
                let (phase, _) = s.status();
                phase == Phase::Ready || phase == Phase::Loading
            })
        })
    }
}
