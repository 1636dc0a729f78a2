//! Prometheus metrics, one registry per app so tests do not share counters.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    phase_duration: HistogramVec,
    images_in_flight: IntGauge,
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
                "Time spent per prediction phase: fetch, decode, preprocess, inference",
            )
            .buckets(BUCKETS.to_vec()),
            &["phase"],
        )?;
        let images_in_flight = IntGauge::new(
            "gateway_images_in_flight",
            "Images being decoded or resized",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(phase_duration.clone()))?;
        registry.register(Box::new(images_in_flight.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            phase_duration,
            images_in_flight,
        })
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

    /// Records the time of one phase.
    pub fn phase(&self, phase: &str, elapsed: Duration) {
        self.phase_duration
            .with_label_values(&[phase])
            .observe(elapsed.as_secs_f64());
    }

    /// The gauge of images in the CPU stage.
    pub fn images_in_flight(&self) -> &IntGauge {
        &self.images_in_flight
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric names, which are fixed above.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
