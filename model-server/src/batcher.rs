//! A bounded queue in front of each model version and the OS thread that
//! drains it: requests already waiting when the model becomes free are run
//! together as one batch, on the inference thread pool.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::backend::{BackendError, Classifier};
use crate::error::InferError;
use crate::repository::{InputSize, Normalisation};
use crate::stats::{BatchTimes, Stats};

/// Input images of one request, already checked against the model's shape.
#[derive(Debug, Clone)]
pub enum Images {
    /// Raw RGB pixels, `[N, H, W, 3]`, normalised by the server.
    Pixels(Vec<u8>),
    /// Already normalised `[N, 3, H, W]`.
    Normalised(Vec<f32>),
}

/// One request for the batcher.
#[derive(Debug, Clone)]
pub struct Request {
    pub batch: usize,
    pub images: Images,
}

/// Model outputs of one request, row-major `[batch, classes]`.
#[derive(Debug, Clone)]
pub struct Response {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
}

struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Response, InferError>>,
    enqueued: Instant,
    span: tracing::Span,
}

/// What the batching thread needs to know about its model.
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    pub input: InputSize,
    pub normalisation: Normalisation,
    pub num_classes: usize,
    pub max_batch_size: usize,
}

/// Cloneable handle that submits requests to one model version's queue.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    name: Arc<str>,
    stats: Arc<Stats>,
}

impl Batcher {
    /// Starts the batching thread of one model version. The thread exits
    /// when every handle is dropped.
    pub fn spawn(
        spec: ModelSpec,
        classifier: Box<dyn Classifier>,
        pool: Arc<rayon::ThreadPool>,
        queue_size: usize,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(queue_size);
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let worker = Worker {
            spec,
            classifier,
            pool,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name(format!("batcher-{name}"))
            .spawn(move || worker.run(rx))?;
        Ok(Self { tx, name, stats })
    }

    /// Queues a request and waits for its result. A full queue is refused at
    /// once rather than letting latency grow without bound.
    pub async fn infer(&self, request: Request) -> Result<Response, InferError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            reply,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InferError::QueueFull(self.name.to_string())),
            Err(TrySendError::Disconnected(_)) => return Err(InferError::ShuttingDown),
        }
        rx.instrument(tracing::debug_span!("queued"))
            .await
            .map_err(|_| InferError::ShuttingDown)?
    }

    /// Statistics of this model version.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

struct Worker {
    spec: ModelSpec,
    classifier: Box<dyn Classifier>,
    pool: Arc<rayon::ThreadPool>,
    stats: Arc<Stats>,
}

impl Worker {
    fn run(self, rx: Receiver<Job>) {
        let mut carried: Option<Job> = None;
        loop {
            let first = match carried.take() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            };
            let mut jobs = Vec::new();
            let mut images = 0;
            self.admit(first, &mut jobs, &mut images);
            while images < self.spec.max_batch_size {
                match rx.try_recv() {
                    Ok(job) if images + job.request.batch > self.spec.max_batch_size => {
                        carried = Some(job);
                        break;
                    }
                    Ok(job) => self.admit(job, &mut jobs, &mut images),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !jobs.is_empty() {
                self.execute(jobs, images);
            }
        }
    }

    /// Adds a job to the batch unless its caller has already gone away.
    fn admit(&self, job: Job, jobs: &mut Vec<Job>, images: &mut usize) {
        if job.reply.is_closed() {
            tracing::debug!(parent: &job.span, "caller went away before inference; dropped");
            return;
        }
        *images += job.request.batch;
        jobs.push(job);
    }

    fn execute(&self, jobs: Vec<Job>, images: usize) {
        let started = Instant::now();
        let span = tracing::info_span!("infer_batch", model = %self.spec.name, version = self.spec.version, batch = images);
        for job in &jobs {
            span.follows_from(&job.span);
        }
        let result = span.in_scope(|| self.pool.install(|| self.compute(&jobs)));
        let done = Instant::now();
        match result {
            Ok((outputs, times)) => {
                self.stats.record_batch(images, times);
                for (job, out) in jobs.into_iter().zip(outputs) {
                    self.stats
                        .record_success(started - job.enqueued, done - job.enqueued, times);
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::error!(parent: &span, error = %e, "batch failed");
                for job in jobs {
                    self.stats.record_failure(done - job.enqueued);
                    let _ = job.reply.send(Err(InferError::Backend(e.clone())));
                }
            }
        }
    }

    fn compute(&self, jobs: &[Job]) -> Result<(Vec<Response>, BatchTimes), BackendError> {
        let err = |e: candle_core::Error| BackendError::Inference(e.to_string());
        let t0 = Instant::now();
        let inputs = jobs
            .iter()
            .map(|j| self.to_tensor(&j.request))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let x = Tensor::cat(&inputs, 0).map_err(err)?;
        let t1 = Instant::now();
        let logits = self.classifier.logits(&x)?;
        let t2 = Instant::now();
        let probabilities = candle_nn::ops::softmax_last_dim(&logits).map_err(err)?;
        let logits = logits
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(err)?;
        let probabilities = probabilities
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(err)?;
        let classes = self.spec.num_classes;
        if logits.len() != x.dim(0).map_err(err)? * classes {
            return Err(BackendError::Inference(format!(
                "model produced {} values, expected {} classes per image",
                logits.len(),
                classes
            )));
        }
        let mut offset = 0;
        let outputs = jobs
            .iter()
            .map(|j| {
                let range = offset * classes..(offset + j.request.batch) * classes;
                offset += j.request.batch;
                Response {
                    logits: logits[range.clone()].to_vec(),
                    probabilities: probabilities[range].to_vec(),
                }
            })
            .collect();
        let t3 = Instant::now();
        Ok((
            outputs,
            BatchTimes {
                input: t1 - t0,
                infer: t2 - t1,
                output: t3 - t2,
            },
        ))
    }

    fn to_tensor(&self, r: &Request) -> candle_core::Result<Tensor> {
        let InputSize {
            height,
            width,
            channels,
        } = self.spec.input;
        match &r.images {
            Images::Pixels(p) => {
                let Normalisation { mean, std } = self.spec.normalisation;
                let x = Tensor::from_slice(p, (r.batch, height, width, channels), &Device::Cpu)?;
                let x = x.to_dtype(DType::F32)?;
                ((x - f64::from(mean))? / f64::from(std))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()
            }
            Images::Normalised(v) => {
                Tensor::from_slice(v, (r.batch, channels, height, width), &Device::Cpu)
            }
        }
    }
}

/// How long the warm-up request may take before the model counts as broken.
pub const WARMUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one all-zero image through the whole path, so the first real request
/// does not pay for lazy initialisation, and a model that cannot run is
/// found before the server reports ready.
pub async fn warm_up(batcher: &Batcher, input: InputSize) -> Result<(), InferError> {
    let request = Request {
        batch: 1,
        images: Images::Pixels(vec![0; input.height * input.width * input.channels]),
    };
    match tokio::time::timeout(WARMUP_TIMEOUT, batcher.infer(request)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(InferError::Backend(BackendError::Inference(
            "warm-up timed out".into(),
        ))),
    }
}
