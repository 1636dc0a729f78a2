//! A bounded queue in front of each model version and the OS threads that
//! drain it, one per instance. Requests waiting when an instance becomes free
//! run together as one batch, on that instance's thread pool; with a queue
//! delay, a batch that is not full waits up to that long after its oldest
//! request for more. An instance whose batch is the only work of the version
//! borrows the idle instances' threads for it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::oneshot;

use crate::backend::{BackendError, Model, Outputs};
use crate::detections::{Detection, Selection};
use crate::error::InferError;
use crate::repository::{InputSize, Normalisation};
use crate::stats::{BatchTimes, Failure, Stats};

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
    /// What a detector keeps of each of this request's images.
    pub selection: Selection,
}

/// Model outputs of one request.
#[derive(Debug, Clone)]
pub enum Response {
    /// A classifier's, row-major `[batch, classes]`.
    Classes {
        logits: Vec<f32>,
        probabilities: Vec<f32>,
    },
    /// A detector's: each image's detections, highest score first.
    Detections(Vec<Vec<Detection>>),
}

struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Response, InferError>>,
    enqueued: Instant,
    span: tracing::Span,
    /// Open while the job waits: closed when its batch starts, so its duration is the queue time.
    queued: tracing::Span,
}

/// The queue was at capacity.
#[derive(Debug)]
struct QueueFull;

/// What a free instance should do next.
#[derive(Debug)]
enum Next {
    /// Run these jobs as one batch.
    Run(Vec<Job>),
    /// A batch could still grow: wait for more requests until then.
    WaitUntil(Instant),
    /// Nothing is queued.
    Idle,
}

/// The queued requests of one model version and the batching policy over
/// them, kept free of threads and channels so the policy is tested directly.
#[derive(Debug)]
struct State {
    jobs: VecDeque<Job>,
    capacity: usize,
    max_batch: usize,
    max_delay: Duration,
    closed: bool,
    /// Requests dropped because their caller went away, not yet counted in the statistics.
    dropped: u64,
    /// Instances running a batch now.
    running: usize,
    /// One instance runs on every thread, its idle peers' included: the others take nothing until it is done.
    borrowed: bool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("batch", &self.request.batch)
            .finish()
    }
}

impl State {
    fn new(capacity: usize, max_batch: usize, max_delay: Duration) -> Self {
        Self {
            jobs: VecDeque::new(),
            capacity,
            max_batch,
            max_delay,
            closed: false,
            dropped: 0,
            running: 0,
            borrowed: false,
        }
    }

    /// Queues a job, or refuses it (dropping it, which answers its caller) when the queue is full.
    fn append(&mut self, job: Job) -> Result<(), QueueFull> {
        if self.jobs.len() >= self.capacity {
            return Err(QueueFull);
        }
        self.jobs.push_back(job);
        Ok(())
    }

    /// Takes the next batch: the oldest requests, in order, whose images fit
    /// in one execution (a request is never split). It runs at once when it
    /// cannot grow any more (full, or the next request does not fit), and
    /// otherwise once its oldest request has waited the queue delay. Requests
    /// whose caller went away (gone, or past its deadline, which cancels the
    /// call) are dropped here, before any compute is spent on them.
    fn next_batch(&mut self, now: Instant) -> Next {
        let before = self.jobs.len();
        self.jobs.retain(|job| {
            let gone = job.reply.is_closed();
            if gone {
                tracing::debug!(parent: &job.span, "caller went away before inference; dropped");
            }
            !gone
        });
        self.dropped += (before - self.jobs.len()) as u64;
        let Some(oldest) = self.jobs.front() else {
            return Next::Idle;
        };
        let mut images = 0;
        let mut count = 0;
        for job in &self.jobs {
            if images + job.request.batch > self.max_batch {
                break;
            }
            images += job.request.batch;
            count += 1;
        }
        let can_grow = images < self.max_batch && count == self.jobs.len();
        let due = oldest.enqueued + self.max_delay;
        if can_grow && now < due && !self.closed {
            return Next::WaitUntil(due);
        }
        // A request larger than a whole batch (more than the merge limit, as
        // requests are checked against max_batch_size) runs alone.
        Next::Run(self.jobs.drain(..count.max(1)).collect())
    }

    fn depth(&self) -> usize {
        self.jobs.len()
    }

    /// Marks a batch, just taken, as running, and says whether it may borrow
    /// every thread: only when nothing else of this version is running or
    /// waiting, so a lone request gets every core while a busy version keeps
    /// one batch per instance.
    fn start(&mut self, can_borrow: bool) -> bool {
        self.running += 1;
        self.borrowed = can_borrow && self.running == 1 && self.jobs.is_empty();
        self.borrowed
    }

    /// Marks a batch as done.
    fn finish(&mut self) {
        self.running -= 1;
        self.borrowed = false;
    }
}

/// The queue shared by the handles and the instances' threads.
struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent VecDeque behind.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes the queue when the last handle goes, so the instances' threads can finish.
struct Handle {
    queue: Arc<Queue>,
    name: Arc<str>,
    stats: Arc<Stats>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.changed.notify_all();
    }
}

/// What the instances' threads need to know about their model.
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    pub input: InputSize,
    pub normalisation: Normalisation,
    pub num_classes: usize,
    /// Most images in a batch merged from several requests. One request of more (requests are checked against
    /// `--max-batch-size` before they are queued) runs alone.
    pub merge_limit: usize,
    /// How long a batch that is not full may wait for more requests.
    pub max_queue_delay: Duration,
}

/// Most images an instance of `threads_per_instance` threads merges into one batch. Several instances without
/// a queue delay merge only as many images as each has threads: a free instance that took everything waiting
/// would work through it on its share of the cores while the next free instance found nothing to do. One
/// instance, or a queue delay (batches asked for), merges up to `max_batch_size`.
pub fn merge_limit(
    max_batch_size: usize,
    max_queue_delay: Duration,
    instances: usize,
    threads_per_instance: usize,
) -> usize {
    if instances > 1 && max_queue_delay.is_zero() {
        threads_per_instance.clamp(1, max_batch_size.max(1))
    } else {
        max_batch_size
    }
}

/// Cloneable handle that submits requests to one model version's queue.
#[derive(Clone)]
pub struct Batcher {
    handle: Arc<Handle>,
}

impl Batcher {
    /// Starts one thread per pool in `pools`, each an instance of the model
    /// that takes the next batch from the version's one queue whenever it is
    /// free and runs it on its own pool; they share `model` and its
    /// weights. A batch that is the version's only work runs on `whole`, when
    /// given: the pool of every thread the instances divide among them. The
    /// threads finish what is queued and exit when every handle is dropped.
    pub fn spawn(
        spec: ModelSpec,
        model: Arc<dyn Model>,
        pools: &[Arc<rayon::ThreadPool>],
        whole: Option<Arc<rayon::ThreadPool>>,
        queue_size: usize,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        // Without a thread to drain it, every request would wait for ever.
        if pools.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a model version needs at least one instance",
            ));
        }
        let queue = Arc::new(Queue {
            state: Mutex::new(State::new(
                queue_size,
                spec.merge_limit,
                spec.max_queue_delay,
            )),
            changed: Condvar::new(),
        });
        let name: Arc<str> = Arc::from(spec.name.as_str());
        // Made before any thread starts: if one cannot start, dropping it closes the queue and the threads
        // already started exit instead of waiting for ever.
        let handle = Arc::new(Handle {
            queue: queue.clone(),
            name: name.clone(),
            stats: stats.clone(),
        });
        let spec = Arc::new(spec);
        for (instance, pool) in pools.iter().enumerate() {
            let worker = Worker {
                spec: spec.clone(),
                instance,
                model: model.clone(),
                pool: pool.clone(),
                whole: whole.clone(),
                stats: stats.clone(),
            };
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("batcher-{name}-{instance}"))
                .spawn(move || {
                    let pool = worker.pool.clone();
                    // Dropping the worker drops its share of the weights; the last one frees them.
                    worker.run(&queue);
                    crate::memory::release_free_pages_on(&pool);
                })?;
        }
        Ok(Self { handle })
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
            queued: tracing::info_span!("queue"),
        };
        let queue = &self.handle.queue;
        {
            let mut state = queue.lock();
            if state.closed {
                return Err(InferError::ShuttingDown);
            }
            if state.append(job).is_err() {
                self.handle.stats.record_refused(Failure::Rejected);
                return Err(InferError::QueueFull(self.handle.name.to_string()));
            }
        }
        queue.changed.notify_one();
        rx.await.map_err(|_| InferError::ShuttingDown)?
    }

    /// Statistics of this model version.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.handle.stats
    }

    /// Requests waiting for the model now.
    pub fn queue_depth(&self) -> usize {
        self.handle.queue.lock().depth()
    }
}

/// One instance: a thread that runs batches on its own pool.
struct Worker {
    spec: Arc<ModelSpec>,
    instance: usize,
    model: Arc<dyn Model>,
    pool: Arc<rayon::ThreadPool>,
    /// Every thread, for a batch that runs alone.
    whole: Option<Arc<rayon::ThreadPool>>,
    stats: Arc<Stats>,
}

/// A batch in progress, counted in the queue's state until it is dropped, even by a panic, so a borrowed
/// run never leaves the other instances waiting for ever.
struct Running<'a> {
    queue: &'a Queue,
    borrowed: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.queue.lock().finish();
        if self.borrowed {
            self.queue.changed.notify_all();
        }
    }
}

impl Worker {
    /// Runs batches until the queue is closed and empty. A worker looks at
    /// the queue only while it is free, so the batch it takes is one it runs
    /// at once; it runs it without the lock, so the other instances keep
    /// taking batches meanwhile.
    fn run(self, queue: &Queue) {
        let mut state = queue.lock();
        loop {
            if state.borrowed {
                // Another instance runs on this one's threads too.
                state = queue
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            let next = state.next_batch(Instant::now());
            for _ in 0..std::mem::take(&mut state.dropped) {
                self.stats.record_refused(Failure::Cancelled);
            }
            match next {
                Next::Run(jobs) => {
                    let borrowed = state.start(self.whole.is_some());
                    let more = state.depth() > 0;
                    drop(state);
                    // The wake-up for what is left may have been this worker's own: pass it on to a free one.
                    if more {
                        queue.changed.notify_one();
                    }
                    let running = Running { queue, borrowed };
                    let pool = match &self.whole {
                        Some(whole) if borrowed => whole,
                        _ => &self.pool,
                    };
                    let images = jobs.iter().map(|j| j.request.batch).sum();
                    self.execute(pool, jobs, images);
                    drop(running);
                    state = queue.lock();
                }
                Next::WaitUntil(due) => {
                    let wait = due.saturating_duration_since(Instant::now());
                    state = queue
                        .changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
                Next::Idle if state.closed => return,
                Next::Idle => {
                    state = queue
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
        }
    }

    fn execute(&self, pool: &rayon::ThreadPool, mut jobs: Vec<Job>, images: usize) {
        for job in &mut jobs {
            job.queued = tracing::Span::none();
        }
        let started = Instant::now();
        let span = tracing::info_span!("infer_batch", model = %self.spec.name, version = self.spec.version, instance = self.instance, batch = images, threads = pool.current_num_threads());
        for job in &jobs {
            span.follows_from(&job.span);
        }
        // Each request's trace gets the execution of the batch it ran in.
        let compute: Vec<_> = jobs
            .iter()
            .map(|j| tracing::info_span!(parent: &j.span, "compute", batch = images))
            .collect();
        let result = span.in_scope(|| pool.install(|| self.compute(&jobs)));
        drop(compute);
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
        let selections: Vec<Selection> = jobs
            .iter()
            .flat_map(|j| std::iter::repeat_n(j.request.selection, j.request.batch))
            .collect();
        let images = selections.len();
        let outputs = self.model.run(&x, &selections)?;
        let t2 = Instant::now();
        let outputs = match outputs {
            Outputs::Logits(logits) => self.split_classes(jobs, &logits, images)?,
            Outputs::Detections(mut found) => {
                if found.len() != images {
                    return Err(BackendError::Inference(format!(
                        "model found boxes for {} images of {images}",
                        found.len()
                    )));
                }
                jobs.iter()
                    .map(|j| Response::Detections(found.drain(..j.request.batch).collect()))
                    .collect()
            }
        };
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

    /// Each request's rows of a batch's logits, with their softmax.
    fn split_classes(
        &self,
        jobs: &[Job],
        logits: &Tensor,
        images: usize,
    ) -> Result<Vec<Response>, BackendError> {
        let err = |e: candle_core::Error| BackendError::Inference(e.to_string());
        let probabilities = candle_nn::ops::softmax_last_dim(logits).map_err(err)?;
        let logits = logits
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(err)?;
        let probabilities = probabilities
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(err)?;
        let classes = self.spec.num_classes;
        if logits.len() != images * classes {
            return Err(BackendError::Inference(format!(
                "model produced {} values, expected {} classes per image",
                logits.len(),
                classes
            )));
        }
        let mut offset = 0;
        Ok(jobs
            .iter()
            .map(|j| {
                let range = offset * classes..(offset + j.request.batch) * classes;
                offset += j.request.batch;
                Response::Classes {
                    logits: logits[range.clone()].to_vec(),
                    probabilities: probabilities[range].to_vec(),
                }
            })
            .collect())
    }

    fn to_tensor(&self, r: &Request) -> candle_core::Result<Tensor> {
        let InputSize {
            height,
            width,
            channels,
        } = self.spec.input;
        match &r.images {
            Images::Pixels(p) => Tensor::from_vec(
                to_planes(p, self.spec.input, self.spec.normalisation),
                (r.batch, channels, height, width),
                &Device::Cpu,
            ),
            Images::Normalised(v) => {
                Tensor::from_slice(v, (r.batch, channels, height, width), &Device::Cpu)
            }
        }
    }
}

/// Interleaved `u8` pixels (`[N, H, W, C]`) as normalised f32 planes (`[N, C, H, W]`), in one pass where four
/// candle ops (cast, subtract, divide, permute) took four buffers. `(p - mean) * (1 / std)` rounds as candle's
/// scalar ops do, so the model sees the same bits. A length that is not whole images is left to the tensor's
/// shape check.
fn to_planes(
    pixels: &[u8],
    input: InputSize,
    Normalisation { mean, std }: Normalisation,
) -> Vec<f32> {
    let scale = (1.0 / f64::from(std)) as f32;
    let image = input.height * input.width * input.channels;
    if image == 0 || !pixels.len().is_multiple_of(image) {
        // The shape check refuses it; only the length matters here.
        return vec![0.0; pixels.len()];
    }
    // Plane by plane: each output plane is written in order into a buffer that is never zeroed first,
    // where a scatter by pixel wrote three planes at once, 200 KB apart, after a memset of all of them.
    let mut out = Vec::with_capacity(pixels.len());
    for src in pixels.chunks_exact(image) {
        for c in 0..input.channels {
            out.extend(
                src[c..]
                    .iter()
                    .step_by(input.channels)
                    .map(|&v| (f32::from(v) - mean) * scale),
            );
        }
    }
    out
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
        selection: Selection::default(),
    };
    match tokio::time::timeout(WARMUP_TIMEOUT, batcher.infer(request)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(InferError::Backend(BackendError::Inference(
            "warm-up timed out".into(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reply = oneshot::Receiver<Result<Response, InferError>>;

    #[test]
    fn planes_are_the_bits_candles_ops_gave() {
        let input = InputSize {
            height: 5,
            width: 7,
            channels: 3,
        };
        // Every byte value, in two images, so each one lands in each channel somewhere.
        let pixels: Vec<u8> = (0..2 * 5 * 7 * 3).map(|i| (i * 37 % 256) as u8).collect();
        for norm in [
            Normalisation {
                mean: 127.5,
                std: 127.5,
            },
            Normalisation {
                mean: 0.0,
                std: 255.0,
            },
            Normalisation {
                mean: 123.675,
                std: 58.395,
            },
        ] {
            let x = Tensor::from_slice(&pixels, (2, 5, 7, 3), &Device::Cpu).unwrap();
            let x = x.to_dtype(DType::F32).unwrap();
            let want = ((x - f64::from(norm.mean)).unwrap() / f64::from(norm.std))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = to_planes(&pixels, input, norm);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{norm:?}");
        }
    }

    fn job(batch: usize, enqueued: Instant) -> (Job, Reply) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request: Request {
                batch,
                images: Images::Pixels(Vec::new()),
                selection: Selection::default(),
            },
            reply,
            enqueued,
            span: tracing::Span::none(),
            queued: tracing::Span::none(),
        };
        (job, rx)
    }

    /// Queues jobs of these sizes, all enqueued at `at`; keeps their receivers alive.
    fn queue(state: &mut State, sizes: &[usize], at: Instant) -> Vec<Reply> {
        sizes
            .iter()
            .map(|&n| {
                let (j, rx) = job(n, at);
                assert!(state.append(j).is_ok());
                rx
            })
            .collect()
    }

    fn sizes(next: Next) -> Vec<usize> {
        match next {
            Next::Run(jobs) => jobs.iter().map(|j| j.request.batch).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_queue_is_idle() {
        let mut state = State::new(8, 4, Duration::ZERO);
        assert!(matches!(state.next_batch(Instant::now()), Next::Idle));
    }

    #[test]
    fn without_delay_whatever_waits_runs_at_once() {
        let now = Instant::now();
        let mut state = State::new(8, 4, Duration::ZERO);
        let _rx = queue(&mut state, &[1], now);
        assert_eq!(sizes(state.next_batch(now)), [1]);
    }

    #[test]
    fn fills_up_to_the_max_batch_in_arrival_order() {
        let now = Instant::now();
        let mut state = State::new(16, 4, Duration::ZERO);
        let _rx = queue(&mut state, &[1, 2, 1, 3], now);
        assert_eq!(sizes(state.next_batch(now)), [1, 2, 1]);
        assert_eq!(sizes(state.next_batch(now)), [3]);
        assert!(matches!(state.next_batch(now), Next::Idle));
    }

    #[test]
    fn never_splits_a_request_and_never_jumps_the_queue() {
        let now = Instant::now();
        let mut state = State::new(16, 4, Duration::from_secs(60));
        // 3 + 2 does not fit: the 2 waits for the next batch, and the 1 behind it
        // does not overtake it even though it would fit.
        let _rx = queue(&mut state, &[3, 2, 1], now);
        assert_eq!(sizes(state.next_batch(now)), [3]);
        assert_eq!(state.depth(), 2);
    }

    #[test]
    fn a_batch_that_can_grow_waits_for_the_delay_of_its_oldest_request() {
        let start = Instant::now();
        let delay = Duration::from_millis(5);
        let mut state = State::new(16, 4, delay);
        let _a = queue(&mut state, &[1], start);
        let _b = queue(&mut state, &[1], start + Duration::from_millis(3));
        match state.next_batch(start + Duration::from_millis(4)) {
            Next::WaitUntil(due) => assert_eq!(due, start + delay),
            other => panic!("expected to wait, got {other:?}"),
        }
        assert_eq!(sizes(state.next_batch(start + delay)), [1, 1]);
    }

    #[test]
    fn a_full_batch_runs_without_waiting_for_the_delay() {
        let now = Instant::now();
        let mut state = State::new(16, 4, Duration::from_secs(60));
        let _rx = queue(&mut state, &[2, 2, 1], now);
        assert_eq!(sizes(state.next_batch(now)), [2, 2]);
        // The 1 left over can still grow: it waits.
        assert!(matches!(state.next_batch(now), Next::WaitUntil(_)));
    }

    #[test]
    fn a_request_larger_than_the_merge_limit_runs_alone_and_nothing_joins_it() {
        let now = Instant::now();
        let mut state = State::new(16, 1, Duration::ZERO);
        let _rx = queue(&mut state, &[1, 1, 4, 1], now);
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert_eq!(sizes(state.next_batch(now)), [4]);
        assert_eq!(sizes(state.next_batch(now)), [1]);
    }

    #[test]
    fn several_instances_without_a_delay_merge_one_image_per_thread() {
        let none = Duration::ZERO;
        assert_eq!(merge_limit(8, none, 1, 2), 8, "one instance");
        assert_eq!(merge_limit(8, none, 2, 1), 1);
        assert_eq!(merge_limit(8, none, 2, 4), 4);
        assert_eq!(merge_limit(2, none, 2, 4), 2, "never past max_batch_size");
        assert_eq!(
            merge_limit(8, Duration::from_millis(1), 2, 1),
            8,
            "a delay asks for batches"
        );
    }

    #[test]
    fn drops_requests_whose_caller_went_away() {
        let now = Instant::now();
        let mut state = State::new(16, 4, Duration::ZERO);
        let mut replies = queue(&mut state, &[1, 2, 1], now);
        // The 2's caller gives up (a cancelled call or an expired deadline drops its receiver).
        drop(replies.remove(1));
        assert_eq!(sizes(state.next_batch(now)), [1, 1]);
        assert!(matches!(state.next_batch(now), Next::Idle));
    }

    #[test]
    fn refuses_beyond_its_capacity() {
        let now = Instant::now();
        let mut state = State::new(2, 4, Duration::ZERO);
        let _rx = queue(&mut state, &[1, 1], now);
        let (extra, _extra_rx) = job(1, now);
        assert!(state.append(extra).is_err());
        assert_eq!(state.depth(), 2);
    }

    const CLASSES: usize = 4;
    /// A first input value that makes [`Gated`] hold its batch until the gate opens.
    const HOLD: f32 = 1.0;

    /// Answers zero logits; a batch starting with [`HOLD`] waits for the gate, as a long batch would.
    #[derive(Default)]
    struct Gated {
        open: Mutex<bool>,
        changed: Condvar,
        held: std::sync::atomic::AtomicUsize,
        /// The threads of the pool each batch ran on, in the order they started.
        threads: Mutex<Vec<usize>>,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.changed.notify_all();
        }
    }

    impl Model for Gated {
        fn run(&self, x: &Tensor, _: &[Selection]) -> Result<Outputs, BackendError> {
            let err = |e: candle_core::Error| BackendError::Inference(e.to_string());
            self.threads
                .lock()
                .unwrap()
                .push(rayon::current_num_threads());
            let first = x.flatten_all().and_then(|t| t.get(0)?.to_scalar::<f32>());
            if first.map_err(err)? == HOLD {
                self.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut open = self.open.lock().unwrap();
                while !*open {
                    open = self.changed.wait(open).unwrap();
                }
            }
            Tensor::zeros((x.dim(0).map_err(err)?, CLASSES), DType::F32, &Device::Cpu)
                .map(Outputs::Logits)
                .map_err(err)
        }
    }

    fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
        Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        )
    }

    /// A batcher of `instances` one-thread instances over a 1x1 model.
    fn spawn_gated(instances: usize) -> std::io::Result<(Batcher, Arc<Gated>)> {
        spawn_gated_with(instances, None)
    }

    /// As [`spawn_gated`], with a pool of `whole` threads for a batch that runs alone.
    fn spawn_gated_with(
        instances: usize,
        whole: Option<usize>,
    ) -> std::io::Result<(Batcher, Arc<Gated>)> {
        let classifier = Arc::new(Gated::default());
        let pools: Vec<_> = (0..instances).map(|_| pool(1)).collect();
        let spec = ModelSpec {
            name: "gated".into(),
            version: 1,
            input: InputSize {
                height: 1,
                width: 1,
                channels: 3,
            },
            normalisation: Normalisation {
                mean: 0.0,
                std: 1.0,
            },
            num_classes: CLASSES,
            merge_limit: 8,
            max_queue_delay: Duration::ZERO,
        };
        let batcher = Batcher::spawn(
            spec,
            classifier.clone(),
            &pools,
            whole.map(pool),
            64,
            Arc::default(),
        )?;
        Ok((batcher, classifier))
    }

    fn image(first: f32) -> Request {
        Request {
            batch: 1,
            images: Images::Normalised(vec![first, 0.0, 0.0]),
            selection: Selection::default(),
        }
    }

    /// Polls `done` every millisecond for up to five seconds, letting other tasks run meanwhile.
    async fn eventually(done: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while !done() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        done()
    }

    #[tokio::test]
    async fn a_busy_instance_does_not_hold_up_the_others() {
        let (batcher, classifier) = spawn_gated(2).unwrap();
        let held = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.infer(image(HOLD)).await }
        });
        // Once it runs, the held request is out of the queue: the next one cannot join its batch.
        assert!(
            eventually(|| classifier.held.load(std::sync::atomic::Ordering::SeqCst) == 1).await
        );
        let free = tokio::time::timeout(Duration::from_secs(5), batcher.infer(image(0.0))).await;
        assert!(
            matches!(free, Ok(Ok(_))),
            "the free instance did not answer"
        );
        classifier.open();
        assert!(held.await.unwrap().is_ok());
        let stats = batcher.stats().snapshot();
        assert_eq!((stats.inference_count, stats.execution_count), (2, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_answer_every_request_once_and_count_it() {
        let (batcher, _classifier) = spawn_gated_with(3, Some(3)).unwrap();
        let requests: Vec<_> = (0..40)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.infer(image(0.0)).await })
            })
            .collect();
        for request in requests {
            let response = request.await.unwrap().unwrap();
            assert!(
                matches!(&response, Response::Classes { logits, .. } if logits == &[0.0; CLASSES]),
                "{response:?}"
            );
        }
        let stats = batcher.stats().snapshot();
        assert_eq!(stats.inference_count, 40);
        assert_eq!(stats.success_count, 40);
    }

    #[test]
    fn only_a_batch_with_nothing_else_running_or_waiting_borrows_every_thread() {
        let now = Instant::now();
        let mut state = State::new(16, 1, Duration::ZERO);
        let _rx = queue(&mut state, &[1, 1], now);
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert!(!state.start(true), "another request is waiting");
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert!(!state.start(true), "another instance is running");
        state.finish();
        state.finish();
        let _rx = queue(&mut state, &[1], now);
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert!(!state.start(false), "no pool to borrow");
        state.finish();
        let _rx = queue(&mut state, &[1], now);
        assert_eq!(sizes(state.next_batch(now)), [1]);
        assert!(state.start(true) && state.borrowed);
        state.finish();
        assert!(!state.borrowed && state.running == 0);
    }

    #[tokio::test]
    async fn a_lone_request_borrows_the_idle_instances_threads_and_the_next_waits_for_them() {
        let (batcher, classifier) = spawn_gated_with(2, Some(2)).unwrap();
        let held = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.infer(image(HOLD)).await }
        });
        assert!(
            eventually(|| classifier.held.load(std::sync::atomic::Ordering::SeqCst) == 1).await
        );
        let next = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.infer(image(0.0)).await }
        });
        // The second instance is idle but its thread is lent: the request waits rather than oversubscribe.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*classifier.threads.lock().unwrap(), [2]);
        assert_eq!(batcher.queue_depth(), 1);
        classifier.open();
        assert!(held.await.unwrap().is_ok());
        assert!(next.await.unwrap().is_ok());
        // Alone again once the first was done, the second borrowed too.
        assert_eq!(*classifier.threads.lock().unwrap(), [2, 2]);
    }

    #[test]
    fn a_batcher_without_instances_is_refused() {
        let e = spawn_gated(0)
            .err()
            .expect("no instance to drain the queue");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn every_instance_thread_exits_when_the_last_handle_goes() {
        let (batcher, classifier) = spawn_gated(3).unwrap();
        // Each instance's thread holds the classifier until it exits.
        assert_eq!(Arc::strong_count(&classifier), 4);
        drop(batcher);
        assert!(eventually(|| Arc::strong_count(&classifier) == 1).await);
    }

    #[test]
    fn a_closed_queue_runs_what_is_left_without_waiting() {
        let now = Instant::now();
        let mut state = State::new(16, 4, Duration::from_secs(60));
        let _rx = queue(&mut state, &[1], now);
        state.closed = true;
        assert_eq!(sizes(state.next_batch(now)), [1]);
    }
}
