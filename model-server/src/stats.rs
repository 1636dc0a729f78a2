//! Per model-version inference statistics, in the shape of Triton's
//! `ModelStatistics` so that perf_analyzer and dashboards read them as-is.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oip_proto::inference::{
    InferBatchStatistics, InferStatistics, ModelStatistics, StatisticDuration,
};

#[derive(Debug, Default, Clone, Copy)]
struct Dur {
    count: u64,
    ns: u64,
}

impl Dur {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns = self
            .ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    fn proto(self) -> Option<StatisticDuration> {
        Some(StatisticDuration {
            count: self.count,
            ns: self.ns,
        })
    }
}

#[derive(Debug, Default, Clone)]
struct BatchDur {
    input: Dur,
    infer: Dur,
    output: Dur,
}

/// Upper bounds of the latency histograms, in seconds: 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the batch-size histogram.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// A histogram with fixed upper bounds: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Clone)]
pub struct Hist {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn add(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Why an accepted or attempted request did not succeed, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The request did not match the model's inputs.
    InvalidArgument,
    /// The queue was full.
    Rejected,
    /// The caller went away, or its deadline passed, before the model ran it.
    Cancelled,
    /// The model failed while running it.
    Backend,
}

impl Failure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::InvalidArgument => "invalid_argument",
            Failure::Rejected => "rejected",
            Failure::Cancelled => "cancelled",
            Failure::Backend => "backend",
        }
    }
}

/// Everything recorded for one model version, copied out for metrics.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub inference_count: u64,
    pub execution_count: u64,
    pub success_count: u64,
    pub success_ns: u64,
    pub queue_ns: u64,
    pub infer_ns: u64,
    pub failures: BTreeMap<Failure, u64>,
    pub queue: Hist,
    pub compute: Hist,
    pub request: Hist,
    pub batch_size: Hist,
}

#[derive(Debug)]
struct Inner {
    last_inference_ms: u64,
    inference_count: u64,
    execution_count: u64,
    success: Dur,
    fail: Dur,
    queue: Dur,
    input: Dur,
    infer: Dur,
    output: Dur,
    batches: BTreeMap<u64, BatchDur>,
    failures: BTreeMap<Failure, u64>,
    queue_hist: Hist,
    compute_hist: Hist,
    request_hist: Hist,
    batch_hist: Hist,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            last_inference_ms: 0,
            inference_count: 0,
            execution_count: 0,
            success: Dur::default(),
            fail: Dur::default(),
            queue: Dur::default(),
            input: Dur::default(),
            infer: Dur::default(),
            output: Dur::default(),
            batches: BTreeMap::new(),
            failures: BTreeMap::new(),
            queue_hist: Hist::new(LATENCY_BUCKETS),
            compute_hist: Hist::new(LATENCY_BUCKETS),
            request_hist: Hist::new(LATENCY_BUCKETS),
            batch_hist: Hist::new(BATCH_BUCKETS),
        }
    }
}

/// Phase timings of one executed batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

/// Counters of one model version; cheap to update from the batching thread.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Stats {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update;
        // counters stay usable.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Records one executed batch of `size` images.
    pub fn record_batch(&self, size: usize, t: BatchTimes) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.with(|s| {
            s.last_inference_ms = now_ms;
            s.execution_count += 1;
            s.inference_count += size as u64;
            s.batch_hist.add(size as f64);
            let b = s.batches.entry(size as u64).or_default();
            b.input.add(t.input);
            b.infer.add(t.infer);
            b.output.add(t.output);
        });
    }

    /// Records one request that completed, with its queue and phase times.
    /// Triton counts the batch's phase durations once per request in it.
    pub fn record_success(&self, queue: Duration, total: Duration, t: BatchTimes) {
        self.with(|s| {
            s.queue_hist.add(queue.as_secs_f64());
            s.compute_hist.add(t.infer.as_secs_f64());
            s.request_hist.add(total.as_secs_f64());
            s.success.add(total);
            s.queue.add(queue);
            s.input.add(t.input);
            s.infer.add(t.infer);
            s.output.add(t.output);
        });
    }

    /// Records one request that failed after it was accepted.
    pub fn record_failure(&self, total: Duration) {
        self.with(|s| {
            s.fail.add(total);
            *s.failures.entry(Failure::Backend).or_default() += 1;
        });
    }

    /// Records one request turned away before the model ran it.
    pub fn record_refused(&self, why: Failure) {
        self.with(|s| *s.failures.entry(why).or_default() += 1);
    }

    /// A copy of the counters and histograms, for metrics.
    pub fn snapshot(&self) -> Snapshot {
        self.with(|s| Snapshot {
            inference_count: s.inference_count,
            execution_count: s.execution_count,
            success_count: s.success.count,
            success_ns: s.success.ns,
            queue_ns: s.queue.ns,
            infer_ns: s.infer.ns,
            failures: s.failures.clone(),
            queue: s.queue_hist.clone(),
            compute: s.compute_hist.clone(),
            request: s.request_hist.clone(),
            batch_size: s.batch_hist.clone(),
        })
    }

    /// Forgets everything recorded so far (the warm-up request is not traffic).
    pub fn reset(&self) {
        self.with(|s| *s = Inner::default());
    }

    /// Snapshot as the protocol message.
    pub fn to_proto(&self, name: &str, version: u64) -> ModelStatistics {
        self.with(|s| ModelStatistics {
            name: name.to_owned(),
            version: version.to_string(),
            last_inference: s.last_inference_ms,
            inference_count: s.inference_count,
            execution_count: s.execution_count,
            inference_stats: Some(InferStatistics {
                success: s.success.proto(),
                fail: s.fail.proto(),
                queue: s.queue.proto(),
                compute_input: s.input.proto(),
                compute_infer: s.infer.proto(),
                compute_output: s.output.proto(),
                cache_hit: Dur::default().proto(),
                cache_miss: Dur::default().proto(),
            }),
            batch_stats: s
                .batches
                .iter()
                .map(|(size, b)| InferBatchStatistics {
                    batch_size: *size,
                    compute_input: b.input.proto(),
                    compute_infer: b.infer.proto(),
                    compute_output: b.output.proto(),
                })
                .collect(),
            memory_usage: Vec::new(),
            response_stats: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_samples_and_executions_separately() {
        let stats = Stats::default();
        let t = BatchTimes {
            input: Duration::from_micros(1),
            infer: Duration::from_micros(10),
            output: Duration::from_micros(2),
        };
        stats.record_batch(3, t);
        stats.record_batch(1, t);
        stats.record_success(Duration::from_micros(5), Duration::from_micros(20), t);
        stats.record_failure(Duration::from_micros(7));
        let p = stats.to_proto("m", 2);
        assert_eq!(
            (p.inference_count, p.execution_count, p.version.as_str()),
            (4, 2, "2")
        );
        let sizes: Vec<_> = p.batch_stats.iter().map(|b| b.batch_size).collect();
        assert_eq!(sizes, [1, 3]);
        let inf = p.inference_stats.unwrap();
        assert_eq!(inf.success.unwrap().count, 1);
        assert_eq!(inf.fail.unwrap().ns, 7_000);
        assert_eq!(inf.queue.unwrap().ns, 5_000);
    }
}
