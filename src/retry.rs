//! The retry policy: exponential backoff (the `backoff` crate's policy) as a pure function of
//! the attempt number, and whether a failed attempt gets another.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use serde::{Deserialize, Serialize};

use crate::engine::Failure;
use crate::units::duration_str;

/// How failed runs are retried: global defaults (`[retry]`) with per-script overrides.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    #[serde(with = "duration_str")]
    pub initial: Duration,
    /// Factor between consecutive delays.
    pub multiplier: f64,
    /// Upper bound of one delay.
    #[serde(with = "duration_str")]
    pub max_interval: Duration,
    /// Each delay is drawn from `delay × (1 ± randomization)`.
    pub randomization: f64,
    /// Attempts in all, the first included; then the run is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(300),
            randomization: 0.2,
            max_attempts: 5,
        }
    }
}

/// A script's own retry settings; empty fields fall back to the global policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOverrides {
    /// Attempts in all, the first included; `None` for the global setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt; `None` for the global setting.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::units::opt_duration_str"
    )]
    pub initial: Option<Duration>,
    /// Factor between consecutive delays; `None` for the global setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Upper bound of one delay; `None` for the global setting.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "crate::units::opt_duration_str"
    )]
    pub max_interval: Option<Duration>,
}

impl RetryPolicy {
    pub fn with(self, o: &RetryOverrides) -> RetryPolicy {
        RetryPolicy {
            initial: o.initial.unwrap_or(self.initial),
            multiplier: o.multiplier.unwrap_or(self.multiplier),
            max_interval: o.max_interval.unwrap_or(self.max_interval),
            max_attempts: o.max_attempts.unwrap_or(self.max_attempts),
            randomization: self.randomization,
        }
    }

    /// The delay after failed attempt number `attempt` (1 for the first attempt).
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut policy = backoff::ExponentialBackoff {
            current_interval: self.initial,
            initial_interval: self.initial,
            randomization_factor: self.randomization.clamp(0.0, 1.0),
            multiplier: self.multiplier.max(1.0),
            max_interval: self.max_interval,
            start_time: Instant::now(),
            max_elapsed_time: None,
            clock: backoff::SystemClock::default(),
        };
        let mut delay = self.initial;
        for _ in 0..attempt.max(1) {
            delay = policy.next_backoff().unwrap_or(self.max_interval);
        }
        delay
    }

    /// After attempt number `attempt` failed with `failure`: the delay before the next
    /// attempt, or none when there is to be no other (the failure is not worth retrying,
    /// or this was the last attempt allowed).
    pub fn retry_after(&self, failure: &Failure, attempt: u32) -> Option<Duration> {
        (failure.retryable && attempt < self.max_attempts).then(|| self.delay(attempt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FailureKind;

    fn exact() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_millis(500),
            randomization: 0.0,
            max_attempts: 4,
        }
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            kind,
            message: "x".into(),
            stack: None,
            retryable: kind.retryable(crate::engine::Retried::ALL),
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = exact();
        let delays: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn randomised_delays_stay_in_their_band() {
        let p = RetryPolicy {
            randomization: 0.5,
            ..exact()
        };
        for _ in 0..100 {
            let d = p.delay(2).as_millis();
            assert!((100..=300).contains(&d), "{d}");
        }
    }

    #[test]
    fn retryable_failures_retry_until_max_attempts() {
        let p = exact();
        let f = failure(FailureKind::Exception);
        assert_eq!(p.retry_after(&f, 1), Some(Duration::from_millis(100)));
        assert_eq!(p.retry_after(&f, 3), Some(Duration::from_millis(400)));
        assert_eq!(p.retry_after(&f, 4), None);
    }

    #[test]
    fn non_retryable_failures_are_not_retried() {
        let f = failure(FailureKind::Syntax);
        assert_eq!(exact().retry_after(&f, 1), None);
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let p = exact().with(&RetryOverrides {
            max_attempts: Some(9),
            ..Default::default()
        });
        assert_eq!(p.max_attempts, 9);
        assert_eq!(p.initial, Duration::from_millis(100));
    }
}
