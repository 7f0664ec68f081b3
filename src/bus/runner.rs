//! The job lanes' end of the attempt path: takes a job message, claims the job's attempt,
//! waits for a run slot, hands the attempt to the `Executor`, and turns its answer into
//! ack, nak-with-delay or term.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::pipeline::attempt::{header, Attempt, HandBack, Outcome};
use crate::pipeline::executor::Executor;
use crate::pipeline::job::Job;
use crate::pipeline::report::run_span;
use crate::store::{Claim, ClaimScope};

/// Runs jobs from the job lanes through the executor.
pub struct Runner {
    /// The attempt path.
    pub executor: Arc<Executor>,
    /// How long JetStream waits for an ack: long runs send progress before it ends.
    pub ack_wait: Duration,
    /// The jobs being handled here.
    pub in_flight: super::Claims,
}

/// A message's fate once its handling ends.
#[derive(Debug, PartialEq)]
enum Settle {
    Ack,
    /// Handed back: comes back after the delay (a retry's backoff, a service unavailable,
    /// shutdown).
    Nak(Option<Duration>),
    Term,
}

impl From<Result<Outcome, HandBack>> for Settle {
    fn from(ended: Result<Outcome, HandBack>) -> Settle {
        match ended {
            Ok(Outcome::Retry { after }) => Settle::Nak(Some(after)),
            Ok(
                Outcome::Ok | Outcome::DeadLettered(_) | Outcome::Skipped(_) | Outcome::Failed(_),
            ) => Settle::Ack,
            Err(hand_back) => Settle::Nak(hand_back.after),
        }
    }
}

/// The header of a job whose attempt is due later (a retry queued by a direct run): Unix
/// time in milliseconds.
pub const RETRY_AT_HEADER: &str = "Scriptd-Retry-At";

impl Runner {
    /// Handles one job message. `hard_stop` cancels a run still going at the end of the
    /// shutdown grace period: its message is handed back for another replica.
    pub async fn handle(&self, msg: jetstream::Message, hard_stop: CancellationToken) {
        // What JetStream says of the delivery, read from its reply subject once.
        let Ok((sequence, delivered)) = msg.info().map(|i| (i.stream_sequence, i.delivered)) else {
            tracing::warn!(subject = %msg.subject, "A job message without its JetStream info; it will be delivered again.");
            return;
        };
        let Some(_in_flight) = self.in_flight.claim(sequence) else {
            tracing::debug!(subject = %msg.subject, "A job already being handled here was delivered again; ignored.");
            return;
        };
        let settle = tokio::select! {
            settle = super::keeping_alive(&msg, self.ack_wait, self.process(&msg, delivered)) => settle,
            _ = hard_stop.cancelled() => {
                self.executor.stats().returned.fetch_add(1, Ordering::Relaxed);
                Settle::Nak(None)
            }
        };
        let result = match settle {
            Settle::Ack => msg.ack().await,
            Settle::Nak(delay) => msg.ack_with(AckKind::Nak(delay)).await,
            Settle::Term => msg.ack_with(AckKind::Term).await,
        };
        if let Err(e) = result {
            tracing::warn!(subject = %msg.subject, error = %e, "Could not settle a job message; it will be redelivered.");
        }
    }

    async fn process(&self, msg: &jetstream::Message, delivered: i64) -> Settle {
        if let Some(due) = header(msg.headers.as_ref(), RETRY_AT_HEADER).and_then(retry_due) {
            // A retry queued by a direct run whose delay is not over: it waits in JetStream.
            // Attempts come from the claims, so this delivery uses none up.
            return Settle::Nak(Some(due));
        }
        let job: Job = match serde_json::from_slice(&msg.payload) {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(subject = %msg.subject, error = %e, "Job message is not a scriptd job; dropped.");
                return Settle::Term;
            }
        };
        let span = run_span(&job, msg.headers.as_ref());
        self.process_job(msg, &job, delivered)
            .instrument(span)
            .await
    }

    async fn process_job(&self, msg: &jetstream::Message, job: &Job, delivered: i64) -> Settle {
        // The claim says which attempt this is, and lets one replica run it: a redelivery
        // may follow a retry, a hand-back at shutdown, a crash or a lost ack, and NATS
        // servers sometimes deliver a message to two replicas at once (nats-server#4460).
        // It is taken before the engine slot: claimed once the slot had come, slots idled
        // through claims' round trips and a flood's overflow into the lanes fed on itself
        // (3-script throughput fell to a third). The lease covers the wait: the message is
        // kept alive meanwhile, so no other replica is handed the job unless this one dies.
        let stats = self.executor.stats();
        let (number, first_at) = match Box::pin(self.executor.claim(job, ClaimScope::Next)).await {
            Ok(Claim::Won {
                attempt,
                first_at,
                taken_over,
            }) => {
                if taken_over {
                    tracing::warn!(job = %job.id, attempt, "Attempt taken over: the replica that claimed it did not record it within its lease.");
                }
                (attempt, first_at)
            }
            Ok(Claim::Ended) => {
                tracing::info!(job = %job.id, delivered, "Job delivered again after it ended; acknowledged without running it.");
                tracing::Span::current().record("outcome", "already_ended");
                return Settle::Ack;
            }
            Ok(Claim::Held { until }) => {
                stats.held_elsewhere.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(job = %job.id, delivered, "Another replica holds this job's attempt; it comes back later.");
                return Settle::Nak(Some(held_wait(until)));
            }
            Ok(Claim::Later { .. }) => return Settle::Nak(Some(Duration::from_secs(1))),
            Err(e) => {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %job.id, error = %e, "Cannot claim the job's attempt; it will come back.");
                return Settle::Nak(Some(Duration::from_secs(2)));
            }
        };
        let Some(slot) = self.executor.slot(&job.tenant).await else {
            stats.returned.fetch_add(1, Ordering::Relaxed);
            self.executor.release(job, number).await;
            return Settle::Nak(None);
        };
        let attempt = Attempt {
            job,
            number,
            first_at,
            headers: msg.headers.as_ref(),
            unclaimed: false,
        };
        self.executor.run(attempt, slot).await.into()
    }
}

/// How long a job whose attempt another replica holds waits before it is delivered again:
/// until the lease ends, but no more than a few seconds (the holder usually records its
/// attempt long before).
fn held_wait(until: chrono::DateTime<Utc>) -> Duration {
    (until - Utc::now())
        .to_std()
        .unwrap_or_default()
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// How long until a `Scriptd-Retry-At` time, if it is still ahead.
fn retry_due(value: &str) -> Option<Duration> {
    let at = value.parse::<i64>().ok()?;
    let left = at - Utc::now().timestamp_millis();
    (left > 0).then(|| Duration::from_millis(left as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_only_while_its_time_is_ahead() {
        let now = Utc::now().timestamp_millis();
        let ahead = retry_due(&(now + 60_000).to_string()).expect("still ahead");
        assert!(ahead > Duration::from_secs(50) && ahead <= Duration::from_secs(60));
        assert_eq!(retry_due(&(now - 1).to_string()), None);
        assert_eq!(retry_due("soon"), None);
    }
}
