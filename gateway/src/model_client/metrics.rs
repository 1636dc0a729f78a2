//! Prometheus metrics of the model-tier client: retries, failed attempts by gRPC code, and the replicas
//! known and ejected.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use tonic::Code;

use super::pool::Pool;

/// gRPC status names as the protocol spells them, indexed by code.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Counters the client updates on every call attempt.
#[derive(Clone)]
pub struct UpstreamMetrics {
    retries: IntCounter,
    errors: IntCounterVec,
}

impl UpstreamMetrics {
    /// Fresh counters (registered by whoever owns the registry).
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(UpstreamMetrics {
            retries: IntCounter::new(
                "gateway_upstream_retries_total",
                "Model-server calls retried on another replica",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "gateway_upstream_errors_total",
                    "Model-server call attempts that failed, by gRPC status code",
                ),
                &["code"],
            )?,
        })
    }

    /// Counts one retry.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Counts one failed attempt.
    pub fn failed(&self, code: Code) {
        let name = CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN");
        self.errors.with_label_values(&[name]).inc();
    }

    /// These counters and a collector that reads the replicas of `pool` at scrape time.
    pub fn collectors(
        &self,
        pool: Arc<Pool>,
    ) -> Result<Vec<Box<dyn Collector>>, prometheus::Error> {
        Ok(vec![
            Box::new(self.retries.clone()),
            Box::new(self.errors.clone()),
            Box::new(Replicas::new(pool)?),
        ])
    }
}

/// The replicas as gauges, and ejections as a counter, read from the pool when scraped: ejection ends by
/// time passing, with no event to update a gauge on.
struct Replicas {
    pool: Arc<Pool>,
    endpoints: IntGaugeVec,
    ejections: IntCounter,
}

impl Replicas {
    fn new(pool: Arc<Pool>) -> Result<Self, prometheus::Error> {
        Ok(Replicas {
            pool,
            endpoints: IntGaugeVec::new(
                Opts::new(
                    "gateway_upstream_endpoints",
                    "Model-server replicas known from discovery (state=known) and of those sitting out a cool-down (state=ejected)",
                ),
                &["state"],
            )?,
            ejections: IntCounter::new(
                "gateway_upstream_ejections_total",
                "Times a replica was ejected after consecutive failures",
            )?,
        })
    }
}

impl Collector for Replicas {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.endpoints.desc();
        descs.extend(self.ejections.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let status = self.pool.status();
        let ejected = status.iter().filter(|e| e.ejected).count();
        self.endpoints
            .with_label_values(&["known"])
            .set(status.len() as i64);
        self.endpoints
            .with_label_values(&["ejected"])
            .set(ejected as i64);
        let total = self.pool.ejections();
        self.ejections
            .inc_by(total.saturating_sub(self.ejections.get()));
        let mut families = self.endpoints.collect();
        families.extend(self.ejections.collect());
        families
    }
}
