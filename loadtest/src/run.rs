//! The two load shapes: a closed loop of workers (siege's `-c`) and an open loop at a fixed rate, whose latency
//! counts from when each request should have been sent, so a server that falls behind cannot hide its queue
//! (coordinated omission).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::report::{Load, Outcome, Recorder, Report};
use crate::target::Target;

/// How much load, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Workers (closed loop), or the most requests outstanding at once (open loop).
    pub concurrency: usize,
    /// Requests per second for an open loop; `None` runs a closed loop.
    pub rate: Option<f64>,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Stop after this many measured requests, if sooner.
    pub requests: Option<u64>,
    /// Load sent first and left out of the report.
    pub warmup: Duration,
    /// Longest wait for one answer; longer ones count as `timeout`.
    pub timeout: Duration,
}

/// Counters shared by every worker.
#[derive(Debug, Default)]
struct Shared {
    /// Every request sent, warm-up included: picks the next prepared request.
    sequence: AtomicU64,
    /// Measured requests claimed, against `--requests`.
    claimed: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    /// Microseconds from the measured window's start to the last measured answer.
    last_done_us: AtomicU64,
}

struct Window {
    measure_from: Instant,
    end: Instant,
}

impl Shared {
    /// Claims a measured request, or says the `--requests` budget is spent.
    fn claim(&self, plan: &Plan) -> bool {
        let n = self.claimed.fetch_add(1, Ordering::Relaxed);
        plan.requests.is_none_or(|max| n < max)
    }

    fn finished(&self, window: &Window, outcome: &Outcome, at: Instant) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if matches!(outcome, Outcome::Failure { .. }) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(
            at.saturating_duration_since(window.measure_from)
                .as_micros(),
        )
        .unwrap_or(u64::MAX);
        self.last_done_us.fetch_max(us, Ordering::Relaxed);
    }
}

async fn send(target: &Target, i: u64, timeout: Duration) -> Outcome {
    tokio::time::timeout(timeout, target.send(i))
        .await
        .unwrap_or_else(|_| Outcome::Failure {
            kind: "timeout".into(),
            bytes: 0,
        })
}

/// Runs the plan against the target and reports what the measured window saw.
pub async fn run(target: Target, plan: Plan, label: String) -> Report {
    let shared = Arc::new(Shared::default());
    let start = Instant::now();
    let window = Arc::new(Window {
        measure_from: start + plan.warmup,
        end: start + plan.warmup + plan.duration,
    });
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(show_progress(shared.clone(), window.measure_from)));
    let recorder = match plan.rate {
        None => closed_loop(&target, &plan, &shared, &window).await,
        Some(rate) => open_loop(&target, &plan, rate, &shared, &window).await,
    };
    if let Some(progress) = progress {
        progress.abort();
        eprint!("\r\x1b[2K");
    }
    let last = Duration::from_micros(shared.last_done_us.load(Ordering::Relaxed));
    // A run cut short by `--requests` lasted until its last answer; one that ran its time, at least that time.
    let elapsed = if recorder.transactions() == 0 {
        Duration::ZERO
    } else if plan
        .requests
        .is_some_and(|max| recorder.transactions() >= max)
    {
        last
    } else {
        last.max(plan.duration)
    };
    let load = Load {
        concurrency: plan.concurrency,
        rate: plan.rate,
    };
    recorder.report(label, load, elapsed)
}

async fn closed_loop(
    target: &Target,
    plan: &Plan,
    shared: &Arc<Shared>,
    window: &Arc<Window>,
) -> Recorder {
    let workers: Vec<_> = (0..plan.concurrency.max(1))
        .map(|_| {
            let (target, plan, shared, window) =
                (target.clone(), *plan, shared.clone(), window.clone());
            tokio::spawn(async move {
                let mut recorder = Recorder::default();
                loop {
                    let sent = Instant::now();
                    if sent >= window.end {
                        break;
                    }
                    let measured = sent >= window.measure_from;
                    if measured && !shared.claim(&plan) {
                        break;
                    }
                    let i = shared.sequence.fetch_add(1, Ordering::Relaxed);
                    let outcome = send(&target, i, plan.timeout).await;
                    if measured {
                        let done = Instant::now();
                        recorder.record(done - sent, &outcome);
                        shared.finished(&window, &outcome, done);
                    }
                }
                recorder
            })
        })
        .collect();
    let mut total = Recorder::default();
    for worker in workers {
        // A worker cannot panic short of a bug; its counts are then lost, not the run.
        if let Ok(recorder) = worker.await {
            total.merge(&recorder);
        }
    }
    total
}

async fn open_loop(
    target: &Target,
    plan: &Plan,
    rate: f64,
    shared: &Arc<Shared>,
    window: &Arc<Window>,
) -> Recorder {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let slots = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0u64.. {
        let Some(intended) = interval
            .checked_mul(u32::try_from(k).unwrap_or(u32::MAX))
            .map(|offset| start + offset)
        else {
            break;
        };
        if intended >= window.end {
            break;
        }
        let measured = intended >= window.measure_from;
        if measured && !shared.claim(plan) {
            break;
        }
        tokio::time::sleep_until(intended).await;
        // Waiting for a free slot is part of the latency: it is measured from `intended`.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (target, shared, window, recorder) = (
            target.clone(),
            shared.clone(),
            window.clone(),
            recorder.clone(),
        );
        let timeout = plan.timeout;
        tasks.spawn(async move {
            let i = shared.sequence.fetch_add(1, Ordering::Relaxed);
            let outcome = send(&target, i, timeout).await;
            drop(slot);
            if measured {
                let done = Instant::now();
                if let Ok(mut r) = recorder.lock() {
                    r.record(done - intended, &outcome);
                }
                shared.finished(&window, &outcome, done);
            }
        });
        // Reap finished tasks as we go so the set stays small on long runs.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    recorder.lock().map(|r| r.clone()).unwrap_or_default()
}

/// One status line on the terminal, rewritten every second.
async fn show_progress(shared: Arc<Shared>, measure_from: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut previous = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        let status = if now < measure_from {
            "warming up".to_owned()
        } else {
            format!(
                "{:>6.1} s  {done} requests  {} req/s  {} errors",
                (now - measure_from).as_secs_f64(),
                done - previous,
                shared.failed.load(Ordering::Relaxed)
            )
        };
        previous = done;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{status}");
        let _ = err.flush();
    }
}
