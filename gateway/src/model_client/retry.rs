//! When a failed model-tier call is tried again: which failures, how often, and after how long.

use std::error::Error;
use std::time::Duration;

use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};

/// How long one deposit counts towards the retry budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries per second allowed however few calls there are, so a quiet gateway still rides out a restart.
const BUDGET_MIN_PER_SEC: u32 = 5;
/// First back-off; each retry doubles it, up to [`MAX_BACKOFF`], then full jitter picks within it.
const BASE_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Retry settings of the model-tier client.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a percentage of calls over the budget window.
    pub budget_percent: f32,
}

/// Tokens for retries, earned by calls: retries stay a fraction of the traffic, so a sick tier is not
/// buried under a retry storm.
pub struct RetryBudget(TpsBudget);

impl RetryBudget {
    /// A budget allowing `percent` retries per 100 calls over the last ten seconds.
    pub fn new(percent: f32) -> Self {
        // TpsBudget asserts a ratio from 0 to 1000; the configuration is checked to be 0..=100 percent,
        // and this keeps a caller that skipped the check from panicking.
        let ratio = if percent.is_finite() {
            (percent / 100.0).clamp(0.0, 10.0)
        } else {
            0.0
        };
        RetryBudget(TpsBudget::new(BUDGET_WINDOW, BUDGET_MIN_PER_SEC, ratio))
    }

    /// Records a call.
    pub fn deposit(&self) {
        self.0.deposit();
    }

    /// Takes a token for a retry, if one is left.
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

/// Whether a failed call may be sent to another replica: it never reached a model or the replica is
/// going away. Inference is idempotent, so a call lost with its connection is safe to send again.
/// Answers about the request itself (INVALID_ARGUMENT, NOT_FOUND) and an expired deadline never are.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::DeadlineExceeded
        | Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange => false,
        // A status the client made up from a transport error carries that error as its source; one
        // sent by the server never does. That includes CANCELLED from a request the connection dropped
        // before sending it, as happens when a draining server's GOAWAY races a new call.
        _ => status.source().is_some(),
    }
}

/// Back-off before retry number `retry` (1 for the first), with full jitter from `random`.
pub fn backoff(retry: u32, random: u64) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1 << retry.saturating_sub(1).min(8))
        .min(MAX_BACKOFF);
    let ceiling_us = ceiling.as_micros() as u64;
    Duration::from_micros(random % (ceiling_us + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_and_transport_failures_are_retried() {
        assert!(is_retryable(&Status::unavailable("restarting")));
        for status in [
            Status::invalid_argument("bad"),
            Status::not_found("no model"),
            Status::deadline_exceeded("late"),
            Status::resource_exhausted("full"),
            Status::internal("bug"),
            Status::cancelled("gone"),
        ] {
            assert!(!is_retryable(&status), "{:?} was retried", status.code());
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transport = Status::from_error(Box::new(io));
        assert!(is_retryable(&transport), "{transport:?}");
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        assert_eq!(backoff(1, 0), Duration::ZERO);
        assert_eq!(backoff(1, 25_000), BASE_BACKOFF);
        assert!(backoff(1, 25_001) < BASE_BACKOFF);
        assert_eq!(backoff(2, 50_000), BASE_BACKOFF * 2);
        assert_eq!(backoff(30, 500_000), MAX_BACKOFF);
    }

    #[test]
    fn the_budget_allows_about_the_configured_share() {
        let budget = RetryBudget::new(20.0);
        for _ in 0..1000 {
            budget.deposit();
        }
        let allowed = (0..1000).take_while(|_| budget.withdraw()).count();
        // 20% of 1000 calls plus the per-second reserve of the window.
        assert!(
            (200..=200 + 60).contains(&allowed),
            "{allowed} retries allowed"
        );
    }
}
