//! The models this server serves, by name and version, and their load state.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device};

use crate::backend;
use crate::batcher::{self, Batcher, ModelSpec};
use crate::error::InferError;
use crate::pools::{self, Pools};
use crate::repository::{self, VersionConfig, VersionEntry};
use crate::stats::Stats;

/// A loaded, warmed-up model version.
pub struct Loaded {
    pub batcher: Batcher,
    pub labels: Arc<Vec<String>>,
}

/// Where a model version is in its life.
#[derive(Clone)]
pub enum State {
    Loading,
    Ready(Arc<Loaded>),
    Unavailable(String),
}

/// One `<model>/<version>` of the repository.
pub struct Slot {
    pub model: String,
    pub version: u64,
    pub config: Result<VersionConfig, String>,
    pub stats: Arc<Stats>,
    entry: VersionEntry,
    state: RwLock<State>,
}

impl Slot {
    /// Current state.
    pub fn state(&self) -> State {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, state: State) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// The loaded model, or why it cannot serve.
    pub fn ready(&self) -> Result<Arc<Loaded>, InferError> {
        match self.state() {
            State::Ready(l) => Ok(l),
            State::Loading => Err(self.not_ready("still loading".into())),
            State::Unavailable(reason) => Err(self.not_ready(reason)),
        }
    }

    /// The parsed config; a version whose config is broken is unavailable.
    pub fn config(&self) -> Result<&VersionConfig, InferError> {
        self.config
            .as_ref()
            .map_err(|reason| self.not_ready(reason.clone()))
    }

    fn not_ready(&self, reason: String) -> InferError {
        InferError::NotReady {
            model: self.model.clone(),
            version: self.version,
            reason,
        }
    }
}

/// Loading parameters shared by every model version.
pub struct LoadOptions {
    /// The inference threads, shared out among each version's instances.
    pub pools: Arc<Pools>,
    /// Instances of a version whose config.json has no `instance_group` (`--instances`).
    pub instances: usize,
    pub device: Device,
    /// Element type of the weights and activations (f16/bf16 only on CUDA).
    pub dtype: DType,
    pub max_batch_size: usize,
    pub max_queue_delay: std::time::Duration,
    pub queue_size: usize,
}

/// Every model version of the repository.
pub struct Registry {
    models: BTreeMap<String, BTreeMap<u64, Arc<Slot>>>,
}

impl Registry {
    /// Registers the scanned versions, all in the `Loading` state.
    pub fn new(entries: Vec<VersionEntry>) -> Self {
        let mut models: BTreeMap<String, BTreeMap<u64, Arc<Slot>>> = BTreeMap::new();
        for entry in entries {
            let slot = Slot {
                model: entry.model.clone(),
                version: entry.version,
                config: entry.config.clone(),
                stats: Arc::default(),
                state: RwLock::new(State::Loading),
                entry,
            };
            models
                .entry(slot.model.clone())
                .or_default()
                .insert(slot.version, Arc::new(slot));
        }
        Self { models }
    }

    /// Every slot, ordered by model and version.
    pub fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.models.values().flat_map(BTreeMap::values)
    }

    /// The versions of one model, oldest first.
    pub fn versions(&self, model: &str) -> Result<&BTreeMap<u64, Arc<Slot>>, InferError> {
        self.models
            .get(model)
            .ok_or_else(|| InferError::ModelNotFound(model.to_owned()))
    }

    /// Finds a model version; an empty version means the newest one.
    pub fn resolve(&self, model: &str, version: &str) -> Result<&Arc<Slot>, InferError> {
        let versions = self.versions(model)?;
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
            return versions.values().next_back().ok_or_else(not_found);
        }
        version
            .parse::<u64>()
            .ok()
            .and_then(|v| versions.get(&v))
            .ok_or_else(not_found)
    }

    /// True when there is at least one model and every version is ready.
    pub fn all_ready(&self) -> bool {
        let mut slots = self.slots().peekable();
        slots.peek().is_some() && slots.all(|s| matches!(s.state(), State::Ready(_)))
    }

    /// Loads and warms up every version; a version that fails is marked
    /// unavailable with the reason, and the others still load.
    pub async fn load_all(&self, opts: &LoadOptions) {
        for slot in self.slots() {
            let state = match load(slot, opts).await {
                Ok(loaded) => {
                    tracing::info!(model = %slot.model, version = slot.version, "model ready");
                    State::Ready(Arc::new(loaded))
                }
                Err(e) => {
                    tracing::error!(model = %slot.model, version = slot.version, error = %e, "model failed to load");
                    State::Unavailable(e.to_string())
                }
            };
            slot.set(state);
        }
    }
}

async fn load(slot: &Slot, opts: &LoadOptions) -> Result<Loaded, InferError> {
    let config = slot.config()?.clone();
    let weights = slot.entry.weights_path(&config);
    let labels_path = slot.entry.dir.join(&config.labels);
    let instances = config.instances(opts.instances);
    let threads_per_instance = pools::threads_per_instance(opts.pools.threads(), instances);
    if instances > opts.pools.threads() {
        tracing::warn!(
            model = %slot.model,
            version = slot.version,
            instances,
            threads = opts.pools.threads(),
            "more instances than inference threads: each gets one thread and they take turns on the cores"
        );
    }
    let load_error = |e: String| InferError::Backend(backend::BackendError::Load(e));
    let instance_pools = opts
        .pools
        .get(instances)
        .map_err(|e| load_error(format!("starting the inference thread pools: {e}")))?;
    let pool = instance_pools
        .first()
        .cloned()
        .ok_or_else(|| load_error("no instance to run on".into()))?;
    let (device, dtype) = (opts.device.clone(), opts.dtype);
    let started = std::time::Instant::now();
    let arch = config.architecture.clone();
    let (classifier, labels) = tokio::task::spawn_blocking(move || {
        pool.install(|| {
            let classifier = backend::load(&arch, &weights, &device, dtype)?;
            let labels = read_labels(&labels_path, config.num_classes)?;
            Ok::<_, InferError>((classifier, labels))
        })
    })
    .await
    .map_err(|e| load_error(e.to_string()))??;
    let spec = ModelSpec {
        name: slot.model.clone(),
        version: slot.version,
        input: config.input,
        normalisation: config.normalisation,
        num_classes: config.num_classes,
        max_batch_size: opts.max_batch_size,
        max_queue_delay: opts.max_queue_delay,
    };
    // One copy of the weights, shared by every instance.
    let batcher = Batcher::spawn(
        spec,
        Arc::from(classifier),
        &instance_pools,
        opts.queue_size,
        slot.stats.clone(),
    )
    .map_err(|e| load_error(format!("starting batcher thread: {e}")))?;
    batcher::warm_up(&batcher, config.input).await?;
    slot.stats.reset();
    tracing::info!(
        model = %slot.model,
        version = slot.version,
        architecture = %config.architecture,
        instances,
        threads_per_instance,
        max_batch_size = opts.max_batch_size,
        max_queue_delay_us = opts.max_queue_delay.as_micros() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded and warmed up"
    );
    Ok(Loaded {
        batcher,
        labels: Arc::new(labels),
    })
}

fn read_labels(path: &Path, classes: usize) -> Result<Vec<String>, InferError> {
    repository::read_labels(path, classes)
        .map_err(|e| InferError::Backend(backend::BackendError::Load(e.to_string())))
}
