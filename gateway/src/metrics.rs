//! Prometheus metrics, one registry per app so tests do not share counters.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    phase_duration: HistogramVec,
    images_in_flight: IntGauge,
    requests_in_flight: IntGauge,
    shed: IntCounter,
    fetch_bytes: IntCounter,
    key_requests: IntCounterVec,
    api_keys: IntGauge,
    api_key_reload_failures: IntCounter,
}

/// Buckets from 1 ms to 30 s: fetches and cold model calls are slow, preprocessing is fast.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "HTTP requests by route and status code",
            ),
            &["route", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )?;
        let phase_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_phase_duration_seconds",
                "Time spent per prediction phase: fetch, decode, preprocess, inference (the model call), total",
            )
            .buckets(BUCKETS.to_vec()),
            &["phase"],
        )?;
        let images_in_flight = IntGauge::new(
            "gateway_images_in_flight",
            "Images being decoded or resized",
        )?;
        let requests_in_flight =
            IntGauge::new("gateway_requests_in_flight", "HTTP requests being served")?;
        let shed = IntCounter::new(
            "gateway_requests_shed_total",
            "Predictions refused with 429 because --max-in-flight were already running",
        )?;
        let fetch_bytes =
            IntCounter::new("gateway_fetch_bytes_total", "Image bytes fetched from URLs")?;
        let key_requests = IntCounterVec::new(
            Opts::new(
                "gateway_api_key_requests_total",
                "Requests let in or rate-limited, by API key name and status code",
            ),
            &["key", "status"],
        )?;
        let api_keys = IntGauge::new("gateway_api_keys", "API keys in use from --api-keys-file")?;
        let api_key_reload_failures = IntCounter::new(
            "gateway_api_key_reload_failures_total",
            "Reads of a changed --api-keys-file that failed, leaving the keys in use as they were",
        )?;
        let metrics = Metrics {
            registry,
            requests,
            request_duration,
            phase_duration,
            images_in_flight,
            requests_in_flight,
            shed,
            fetch_bytes,
            key_requests,
            api_keys,
            api_key_reload_failures,
        };
        metrics.register(Box::new(metrics.requests.clone()))?;
        metrics.register(Box::new(metrics.request_duration.clone()))?;
        metrics.register(Box::new(metrics.phase_duration.clone()))?;
        metrics.register(Box::new(metrics.images_in_flight.clone()))?;
        metrics.register(Box::new(metrics.requests_in_flight.clone()))?;
        metrics.register(Box::new(metrics.shed.clone()))?;
        metrics.register(Box::new(metrics.fetch_bytes.clone()))?;
        metrics.register(Box::new(metrics.key_requests.clone()))?;
        metrics.register(Box::new(metrics.api_keys.clone()))?;
        metrics.register(Box::new(metrics.api_key_reload_failures.clone()))?;
        Ok(metrics)
    }

    /// Adds a collector of another part (the model client's retries, errors and replicas).
    pub fn register(&self, collector: Box<dyn Collector>) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a finished request made with the API key named `key`.
    pub fn key_request(&self, key: &str, status: u16) {
        self.key_requests
            .with_label_values(&[key, &status.to_string()])
            .inc();
    }

    /// Records how many API keys are in use.
    pub fn api_keys_loaded(&self, keys: usize) {
        self.api_keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// Counts a changed API key file that could not be used.
    pub fn api_keys_reload_failed(&self) {
        self.api_key_reload_failures.inc();
    }

    /// Records the time of one phase.
    pub fn phase(&self, phase: &str, elapsed: Duration) {
        self.phase_duration
            .with_label_values(&[phase])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one HTTP request as in flight until the guard is dropped, however the request ends.
    pub fn request_started(&self) -> InFlight {
        InFlight::new(&self.requests_in_flight)
    }

    /// Counts a prediction refused because the gateway was full.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// Counts the bytes of one fetched image.
    pub fn fetched(&self, bytes: usize) {
        self.fetch_bytes.inc_by(bytes as u64);
    }

    /// Counts one image as in the CPU stage until the guard is dropped.
    pub fn image_started(&self) -> InFlight {
        InFlight::new(&self.images_in_flight)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric names, which are fixed above.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Holds one unit of an in-flight gauge; a cancelled request (client gone) drops it too.
pub struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
