//! Turning a version directory into a [`Loaded`] model: weights, labels, instances, batcher, warm-up.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::backend;
use crate::batcher::{self, Batcher, ModelSpec};
use crate::error::InferError;
use crate::pools::{self, Pools};
use crate::registry::Loaded;
use crate::repository::{self, Fingerprint, VersionConfig};
use crate::stats::Stats;

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

/// What to load: one version directory as it is now.
pub struct Source<'a> {
    pub model: &'a str,
    pub version: u64,
    pub dir: &'a Path,
    pub config: VersionConfig,
    pub fingerprint: Option<Fingerprint>,
}

fn load_error(e: impl std::fmt::Display) -> InferError {
    InferError::Backend(backend::BackendError::Load(e.to_string()))
}

/// Loads a version and answers one warm-up request with it, so it is ready for traffic when this returns.
pub async fn load(source: Source<'_>, opts: &LoadOptions) -> Result<Loaded, InferError> {
    let Source {
        model,
        version,
        dir,
        config,
        fingerprint,
    } = source;
    let kind = backend::Kind::of(&config.architecture).map_err(InferError::Backend)?;
    let labels_path = dir.join(&config.labels);
    let instances = config.instances(opts.instances);
    let threads_per_instance = pools::threads_per_instance(opts.pools.threads(), instances);
    if instances > opts.pools.threads() {
        tracing::warn!(
            model,
            version,
            instances,
            threads = opts.pools.threads(),
            "more instances than inference threads: each gets one thread and they take turns on the cores"
        );
    }
    let instance_pools = opts
        .pools
        .get(instances)
        .map_err(|e| load_error(format!("starting the inference thread pools: {e}")))?;
    let lends = threads_per_instance < opts.pools.threads();
    // A lone batch borrows the idle instances' threads: the layout of one instance with every thread.
    let whole = if lends {
        let whole = opts
            .pools
            .get(1)
            .map_err(|e| load_error(format!("starting the inference thread pool: {e}")))?;
        whole.first().cloned()
    } else {
        None
    };
    let pool = instance_pools
        .first()
        .cloned()
        .ok_or_else(|| load_error("no instance to run on"))?;
    let (device, dtype) = (opts.device.clone(), opts.dtype);
    let started = std::time::Instant::now();
    let (version_config, version_dir) = (config.clone(), dir.to_path_buf());
    let (model_impl, labels) = tokio::task::spawn_blocking(move || {
        let loaded = pool.install(|| {
            let model = backend::load(&version_config, &version_dir, &device, dtype)?;
            let labels = repository::read_labels(&labels_path, version_config.num_classes)
                .map_err(load_error)?;
            Ok::<_, InferError>((model, labels))
        });
        // The file's bytes and the conversion's temporaries are free now: a load leaves only the weights.
        crate::memory::release_free_pages_on(&pool);
        loaded
    })
    .await
    .map_err(load_error)??;
    let merge_limit = batcher::merge_limit(
        opts.max_batch_size,
        opts.max_queue_delay,
        instances,
        threads_per_instance,
    );
    let spec = ModelSpec {
        name: model.to_owned(),
        version,
        input: config.input,
        normalisation: config.normalisation,
        num_classes: config.num_classes,
        merge_limit,
        max_queue_delay: opts.max_queue_delay,
    };
    let stats = Arc::new(Stats::default());
    // One copy of the weights, shared by every instance.
    let batcher = Batcher::spawn(
        spec,
        Arc::from(model_impl),
        &instance_pools,
        whole,
        opts.queue_size,
        stats.clone(),
    )
    .map_err(|e| load_error(format!("starting batcher thread: {e}")))?;
    batcher::warm_up(&batcher, config.input).await?;
    // The warm-up request is not traffic.
    stats.reset();
    tracing::info!(
        model,
        version,
        architecture = %config.architecture,
        instances,
        threads_per_instance,
        max_batch_size = opts.max_batch_size,
        merge_limit,
        lends_threads = lends,
        max_queue_delay_us = opts.max_queue_delay.as_micros() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "loaded and warmed up"
    );
    Ok(Loaded {
        batcher,
        labels: Arc::new(labels),
        kind,
        config,
        fingerprint,
    })
}
