//! Prometheus metrics, read at scrape time from each model version's statistics, so that `/metrics` and the
//! gRPC ModelStatistics never disagree. Names and meanings follow Triton's (`nv_inference_*`).

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, Registry as PromRegistry, TextEncoder};

use crate::registry::Registry;
use crate::stats::{Hist, Snapshot, Stats};

/// `(name, help, type)` of every family the model collector reports.
const FAMILIES: &[(&str, &str, MetricType)] = &[
    (
        "nv_inference_request_success",
        "Inference requests that succeeded",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_request_failure",
        "Inference requests that failed, by reason",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_count",
        "Images inferred (a batch of N counts N)",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_exec_count",
        "Model executions (batches run)",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative end-to-end time of successful requests in the server, microseconds",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative time successful requests waited in the queue, microseconds",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative model execution time of successful requests, microseconds",
        MetricType::COUNTER,
    ),
    (
        "nv_inference_queue_duration_seconds",
        "Time a successful request waited in the queue",
        MetricType::HISTOGRAM,
    ),
    (
        "nv_inference_compute_duration_seconds",
        "Model execution time of the batch a successful request ran in",
        MetricType::HISTOGRAM,
    ),
    (
        "nv_inference_request_duration_seconds",
        "End-to-end time of a successful request in the server",
        MetricType::HISTOGRAM,
    ),
    (
        "nv_inference_batch_size",
        "Images per model execution",
        MetricType::HISTOGRAM,
    ),
    (
        "nv_inference_pending_request_count",
        "Requests waiting in the queue now",
        MetricType::GAUGE,
    ),
    (
        "nv_model_loaded",
        "1 when the model version is loaded and warmed up, else 0",
        MetricType::GAUGE,
    ),
];

/// The metrics registry of one server: the model collector plus, on Linux, process metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: PromRegistry,
}

impl Metrics {
    /// Registers the collectors.
    pub fn new(models: Arc<Registry>) -> Result<Self, prometheus::Error> {
        let registry = PromRegistry::new();
        registry.register(Box::new(ModelCollector::new(models)?))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self { registry })
    }

    /// Adds a collector kept elsewhere (the lifecycle's load failures).
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for I/O; a malformed family would be a bug here, not a request error.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

struct ModelCollector {
    models: Arc<Registry>,
    descs: Vec<Desc>,
}

impl ModelCollector {
    fn new(models: Arc<Registry>) -> Result<Self, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _)| {
                let mut labels = vec!["model".to_owned(), "version".to_owned()];
                if *name == "nv_inference_request_failure" {
                    labels.push("reason".to_owned());
                }
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    labels,
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { models, descs })
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn counter(label: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(label);
    m.set_counter(c);
    m
}

fn gauge(label: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(label);
    m.set_gauge(g);
    m
}

fn histogram(label: Vec<LabelPair>, h: &Hist) -> Metric {
    let mut cumulative = 0;
    let buckets = h
        .bounds
        .iter()
        .zip(&h.counts)
        .map(|(&bound, &count)| {
            cumulative += count;
            let mut b = Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut p = Histogram::default();
    p.set_sample_count(h.count);
    p.set_sample_sum(h.sum);
    p.set_bucket(buckets);
    let mut m = Metric::from_label(label);
    m.set_histogram(p);
    m
}

/// The metrics of one model version, in `FAMILIES` order.
fn version_metrics(
    model: &str,
    version: &str,
    s: &Snapshot,
    pending: usize,
    loaded: bool,
) -> Vec<Vec<Metric>> {
    let l = || labels(&[("model", model), ("version", version)]);
    let failures = s
        .failures
        .iter()
        .map(|(why, n)| {
            counter(
                labels(&[
                    ("model", model),
                    ("version", version),
                    ("reason", why.as_str()),
                ]),
                *n as f64,
            )
        })
        .collect();
    vec![
        vec![counter(l(), s.success_count as f64)],
        failures,
        vec![counter(l(), s.inference_count as f64)],
        vec![counter(l(), s.execution_count as f64)],
        vec![counter(l(), (s.success_ns / 1000) as f64)],
        vec![counter(l(), (s.queue_ns / 1000) as f64)],
        vec![counter(l(), (s.infer_ns / 1000) as f64)],
        vec![histogram(l(), &s.queue)],
        vec![histogram(l(), &s.compute)],
        vec![histogram(l(), &s.request)],
        vec![histogram(l(), &s.batch_size)],
        vec![gauge(l(), pending as f64)],
        vec![gauge(l(), if loaded { 1.0 } else { 0.0 })],
    ]
}

impl Collector for ModelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families: Vec<MetricFamily> = FAMILIES
            .iter()
            .map(|(name, help, kind)| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_owned());
                f.set_help((*help).to_owned());
                f.set_field_type(*kind);
                f
            })
            .collect();
        for slot in self.models.slots() {
            let serving = slot.serving();
            let (pending, loaded, snapshot) = match &serving {
                Some(l) => (l.batcher.queue_depth(), true, l.stats().snapshot()),
                None => (0, false, Stats::default().snapshot()),
            };
            let version = slot.version.to_string();
            let metrics = version_metrics(&slot.model, &version, &snapshot, pending, loaded);
            for (family, mut metrics) in families.iter_mut().zip(metrics) {
                family.mut_metric().append(&mut metrics);
            }
        }
        // A family with no samples (no failures yet) is left out, as the text format expects.
        families.retain(|f| !f.get_metric().is_empty());
        families
    }
}
