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

#[derive(Debug, Default)]
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
            s.success.add(total);
            s.queue.add(queue);
            s.input.add(t.input);
            s.infer.add(t.infer);
            s.output.add(t.output);
        });
    }

    /// Records one request that failed after it was accepted.
    pub fn record_failure(&self, total: Duration) {
        self.with(|s| s.fail.add(total));
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
