//! What a run measured: a recorder per worker, merged into one report, printed siege-style or as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track, in microseconds (one hour); longer ones are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

/// Phase timings a gateway reports in `timings_ms`, in the order they are printed.
pub const GATEWAY_PHASES: [&str; 5] = ["fetch", "decode", "preprocess", "inference", "total"];

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An answer of the expected kind, with its body size and any phase timings it reported (ms).
    Success {
        bytes: u64,
        timings: Option<[f64; GATEWAY_PHASES.len()]>,
    },
    /// A failure, by kind: `http_503`, `grpc_unavailable`, `transport`, `timeout`, `bad_response`.
    Failure { kind: String, bytes: u64 },
}

fn histogram() -> Histogram<u64> {
    // Three significant digits: 0.1 % error at any magnitude, a few hundred KiB per histogram.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

/// Counts and latencies of the requests one worker finished inside the measured window.
#[derive(Debug, Clone)]
pub struct Recorder {
    latency: Histogram<u64>,
    successful: u64,
    failed: u64,
    bytes: u64,
    errors: BTreeMap<String, u64>,
    phases: Vec<Histogram<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: histogram(),
            successful: 0,
            failed: 0,
            bytes: 0,
            errors: BTreeMap::new(),
            phases: GATEWAY_PHASES.iter().map(|_| histogram()).collect(),
        }
    }
}

impl Recorder {
    /// Adds one finished request.
    pub fn record(&mut self, latency: Duration, outcome: &Outcome) {
        self.latency.saturating_record(micros(latency));
        match outcome {
            Outcome::Success { bytes, timings } => {
                self.successful += 1;
                self.bytes += bytes;
                for (histogram, ms) in self.phases.iter_mut().zip(timings.iter().flatten()) {
                    histogram.saturating_record(micros(Duration::from_secs_f64(ms.max(0.0) / 1e3)));
                }
            }
            Outcome::Failure { kind, bytes } => {
                self.failed += 1;
                self.bytes += bytes;
                *self.errors.entry(kind.clone()).or_default() += 1;
            }
        }
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        for (mine, theirs) in self.phases.iter_mut().zip(&other.phases) {
            let _ = mine.add(theirs);
        }
        self.successful += other.successful;
        self.failed += other.failed;
        self.bytes += other.bytes;
        for (kind, count) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += count;
        }
    }

    /// Requests recorded so far.
    pub fn transactions(&self) -> u64 {
        self.successful + self.failed
    }

    /// The report of a run whose measured window lasted `elapsed`.
    pub fn report(&self, target: String, load: Load, elapsed: Duration) -> Report {
        let transactions = self.transactions();
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let phases = GATEWAY_PHASES
            .iter()
            .zip(&self.phases)
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| {
                let at = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
                let summary = PhaseSummary {
                    p50: at(0.5),
                    p90: at(0.9),
                    p99: at(0.99),
                };
                ((*name).to_owned(), summary)
            })
            .collect();
        Report {
            target,
            concurrency: load.concurrency,
            rate: load.rate,
            transactions,
            successful: self.successful,
            failed: self.failed,
            availability_pct: if transactions == 0 {
                0.0
            } else {
                100.0 * self.successful as f64 / transactions as f64
            },
            elapsed_s: secs,
            throughput_rps: per_sec(transactions as f64),
            bytes_received: self.bytes,
            throughput_mb_s: per_sec(self.bytes as f64 / 1e6),
            // Little's law, as siege's "Concurrency": time spent waiting for answers over the time elapsed.
            mean_in_flight: per_sec(self.latency.mean() / 1e6 * transactions as f64),
            latency_ms: LatencySummary::of(&self.latency),
            errors: self.errors.clone(),
            server_timings_ms: phases,
        }
    }
}

/// The load a run applied.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Load {
    /// Workers (closed loop) or most requests outstanding (open loop).
    pub concurrency: usize,
    /// Requests per second scheduled, for an open loop.
    pub rate: Option<f64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                min: 0.0,
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        let ms = |us: u64| us as f64 / 1e3;
        Self {
            min: ms(h.min()),
            mean: h.mean() / 1e3,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Percentiles of one phase the server reported, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhaseSummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Everything a run measured; `--json` prints this as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub transactions: u64,
    pub successful: u64,
    pub failed: u64,
    pub availability_pct: f64,
    pub elapsed_s: f64,
    pub throughput_rps: f64,
    pub bytes_received: u64,
    pub throughput_mb_s: f64,
    pub mean_in_flight: f64,
    pub latency_ms: LatencySummary,
    pub errors: BTreeMap<String, u64>,
    /// Percentiles of the phase timings a gateway returned with its answers (absent for gRPC).
    pub server_timings_ms: BTreeMap<String, PhaseSummary>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_ms;
        writeln!(f, "Target:                 {}", self.target)?;
        match self.rate {
            Some(rate) => writeln!(
                f,
                "Load:                   open loop, {rate} req/s, at most {} outstanding",
                self.concurrency
            )?,
            None => writeln!(
                f,
                "Load:                   closed loop, {} workers",
                self.concurrency
            )?,
        }
        writeln!(f, "Transactions:           {:>12} hits", self.transactions)?;
        writeln!(
            f,
            "Availability:           {:>12.2} %",
            self.availability_pct
        )?;
        writeln!(f, "Elapsed time:           {:>12.2} secs", self.elapsed_s)?;
        writeln!(
            f,
            "Data transferred:       {:>12.2} MB",
            self.bytes_received as f64 / 1e6
        )?;
        writeln!(f, "Response time:          {:>12.2} ms (mean)", l.mean)?;
        writeln!(
            f,
            "Transaction rate:       {:>12.2} trans/sec",
            self.throughput_rps
        )?;
        writeln!(
            f,
            "Throughput:             {:>12.2} MB/sec",
            self.throughput_mb_s
        )?;
        writeln!(f, "Concurrency:            {:>12.2}", self.mean_in_flight)?;
        writeln!(f, "Successful transactions:{:>12}", self.successful)?;
        writeln!(f, "Failed transactions:    {:>12}", self.failed)?;
        writeln!(
            f,
            "Latency (ms):           min {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.min, l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "Errors:                 {}", errors.join(", "))?;
        }
        for name in GATEWAY_PHASES {
            if let Some(p) = self.server_timings_ms.get(name) {
                writeln!(
                    f,
                    "Server {name:<16} p50 {:.2}  p90 {:.2}  p99 {:.2} ms",
                    p.p50, p.p90, p.p99
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: f64) -> Outcome {
        Outcome::Success {
            bytes: 10,
            timings: Some([0.0, 1.0, 2.0, ms, ms + 3.0]),
        }
    }

    #[test]
    fn percentiles_follow_the_recorded_latencies() {
        let mut r = Recorder::default();
        for ms in 1..=1000u64 {
            r.record(Duration::from_millis(ms), &ok(ms as f64));
        }
        let report = r.report(
            "t".into(),
            Load {
                concurrency: 1,
                rate: None,
            },
            Duration::from_secs(10),
        );
        let l = &report.latency_ms;
        // HDR keeps three significant digits.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.001;
        assert!(
            near(l.min, 1.0) && near(l.p50, 500.0) && near(l.p90, 900.0),
            "{l:?}"
        );
        assert!(
            near(l.p99, 990.0) && near(l.p999, 999.0) && near(l.max, 1000.0),
            "{l:?}"
        );
        assert!(near(l.mean, 500.5), "{l:?}");
        assert_eq!(report.transactions, 1000);
        assert!((report.throughput_rps - 100.0).abs() < 1e-9);
        let inference = &report.server_timings_ms["inference"];
        assert!(near(inference.p50, 500.0), "{inference:?}");
        assert!(near(report.server_timings_ms["total"].p50, 503.0));
    }

    #[test]
    fn failures_are_counted_by_kind_and_lower_availability() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for _ in 0..6 {
            a.record(Duration::from_millis(5), &ok(1.0));
        }
        for kind in ["http_503", "http_503", "timeout"] {
            b.record(
                Duration::from_millis(5),
                &Outcome::Failure {
                    kind: kind.into(),
                    bytes: 0,
                },
            );
        }
        b.record(Duration::from_millis(5), &ok(1.0));
        a.merge(&b);
        let report = a.report(
            "t".into(),
            Load {
                concurrency: 2,
                rate: None,
            },
            Duration::from_secs(1),
        );
        assert_eq!((report.successful, report.failed), (7, 3));
        assert!((report.availability_pct - 70.0).abs() < 1e-9);
        assert_eq!(report.errors.get("http_503"), Some(&2));
        assert_eq!(report.errors.get("timeout"), Some(&1));
        assert_eq!(report.bytes_received, 70);
        let text = report.to_string();
        assert!(
            text.contains("Availability:") && text.contains("http_503 2"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_run_reports_zeroes() {
        let report = Recorder::default().report(
            "t".into(),
            Load {
                concurrency: 1,
                rate: Some(5.0),
            },
            Duration::ZERO,
        );
        assert_eq!(report.transactions, 0);
        assert_eq!(report.availability_pct, 0.0);
        assert_eq!(report.throughput_rps, 0.0);
        assert!(report.server_timings_ms.is_empty());
    }
}
