//! A closed-loop load generator against the gateway: N workers, each sending the next request as soon as
//! the previous one is answered, recording every outcome and latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::sync::Mutex;

/// What one request got.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// HTTP status, or `None` when no answer came (connection error).
    pub status: Option<u16>,
    /// The error or the body of an unexpected status.
    pub detail: String,
    /// Whether a 429 carried `Retry-After`.
    pub retry_after: bool,
    /// Time to the answer.
    pub latency: Duration,
    /// The model version a 200 names.
    pub version: Option<String>,
}

/// Every outcome of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    /// Requests answered with `status`.
    pub fn count(&self, status: u16) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == Some(status))
            .count()
    }

    /// Requests that got anything but 200.
    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| o.status != Some(200))
            .collect()
    }

    /// The `q` quantile (0..=1) of the latencies of requests answered with `status`.
    pub fn quantile(&self, status: u16, q: f64) -> Duration {
        let mut latencies: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.status == Some(status))
            .map(|o| o.latency)
            .collect();
        latencies.sort();
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[index]
    }
}

/// A running load; stop it with [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// Requests answered so far.
    pub done: Arc<AtomicUsize>,
}

/// The JSON body of a prediction of a small PNG, sent by every worker.
pub fn predict_body() -> String {
    let png = super::small_png();
    serde_json::json!({ "image": base64::engine::general_purpose::STANDARD.encode(png) })
        .to_string()
}

impl Load {
    /// Starts `concurrency` workers posting to `{gateway}/predict`; each stops after its current
    /// request once stopped, or after `limit` requests in all when given.
    pub fn start(gateway: &str, concurrency: usize, limit: Option<usize>) -> Load {
        let client = super::stack::http_client();
        let body = Arc::new(predict_body());
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let done = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let url = format!("{gateway}/predict");
        let workers = (0..concurrency)
            .map(|_| {
                let (client, body, stop, report, done, started, url) = (
                    client.clone(),
                    body.clone(),
                    stop.clone(),
                    report.clone(),
                    done.clone(),
                    started.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst)
                        && limit.is_none_or(|l| started.fetch_add(1, Ordering::SeqCst) < l)
                    {
                        let t = Instant::now();
                        let result = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.as_str().to_owned())
                            .send()
                            .await;
                        let outcome = match result {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let retry_after = response.headers().contains_key("retry-after");
                                let detail = response.text().await.unwrap_or_default();
                                let latency = t.elapsed();
                                let version = (status == 200)
                                    .then(|| {
                                        serde_json::from_str::<serde_json::Value>(&detail).ok()
                                    })
                                    .flatten()
                                    .and_then(|body| {
                                        Some(body["model"]["version"].as_str()?.to_owned())
                                    });
                                Outcome {
                                    status: Some(status),
                                    detail: if status == 200 { String::new() } else { detail },
                                    retry_after,
                                    latency,
                                    version,
                                }
                            }
                            Err(e) => Outcome {
                                status: None,
                                detail: format!("{e:?}"),
                                retry_after: false,
                                latency: t.elapsed(),
                                version: None,
                            },
                        };
                        report.lock().await.outcomes.push(outcome);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            workers,
            done,
        }
    }

    /// Stops the workers, waits for their last requests, and returns the report.
    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        std::mem::take(&mut *self.report.lock().await)
    }

    /// The outcomes so far, in the order they were answered.
    pub async fn outcomes(&self) -> Vec<Outcome> {
        self.report.lock().await.outcomes.clone()
    }

    /// Waits until `n` requests have been answered, or panics after `within`.
    pub async fn wait_done(&self, n: usize, within: Duration) {
        let started = Instant::now();
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                started.elapsed() < within,
                "only {} of {n} requests answered within {within:?}",
                self.done.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Resident memory of this process in KiB, from /proc.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
