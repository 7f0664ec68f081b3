//! How an attempt's end is told: `AttemptEnded`, one typed event per outcome whose `emit`
//! updates the counters, the metrics, the run's span and the log line together, so they
//! cannot disagree; and the span each attempt runs in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use tracing::field::Empty;

use super::attempt::{header, Outcome};
use super::job::Job;
use crate::domain::{RunStatus, Version};
use crate::observe::metrics::Metrics;

/// Counters of attempts since start.
#[derive(Debug, Default)]
pub struct AttemptStats {
    /// Attempts that ended ok.
    pub succeeded: AtomicU64,
    /// Attempts that failed and will be retried.
    pub retried: AtomicU64,
    /// Jobs sent to the dead-letter subject.
    pub dead_lettered: AtomicU64,
    /// Attempts recorded as skipped (see `SkipReason`).
    pub skipped: AtomicU64,
    /// Synchronous runs (HTTP requests) that failed; they are not retried.
    pub failed: AtomicU64,
    /// Run records committed (of every status).
    pub recorded: AtomicU64,
    /// Jobs handed back unfinished (shutdown, or their record could not be written).
    pub returned: AtomicU64,
    /// Deliveries of a job whose attempt another replica held: handed back to wait.
    pub held_elsewhere: AtomicU64,
}

/// An attempt ended with a record.
pub struct AttemptEnded<'a> {
    /// The job.
    pub job: &'a Job,
    /// Which attempt.
    pub attempt: u32,
    /// The version that ran, or would have.
    pub version: Option<Version>,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// The failure kind of a run that failed, or a skip's reason.
    pub kind: Option<&'a str>,
    /// How long the run took (none for a skip).
    pub took: Option<Duration>,
}

impl AttemptEnded<'_> {
    /// Counts the attempt, measures it, marks the current (the run's) span and logs it.
    pub fn emit(self, stats: &AttemptStats, metrics: &Metrics) {
        let AttemptEnded {
            job,
            attempt,
            version,
            outcome,
            kind,
            took,
        } = self;
        let status = outcome.status();
        let counter = match status {
            RunStatus::Ok => &stats.succeeded,
            RunStatus::Retrying => &stats.retried,
            RunStatus::DeadLettered => &stats.dead_lettered,
            RunStatus::Skipped => &stats.skipped,
            RunStatus::Failed => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics.run_finished(&job.tenant, status.as_str(), kind, took);
        if let Outcome::Skipped(reason @ crate::domain::SkipReason::Overlap) = outcome {
            metrics.schedule_skipped(reason.as_str(), 1);
        }
        tracing::Span::current().record("outcome", status.as_str());
        let duration_ms = took.map(|t| t.as_secs_f64() * 1000.0);
        let version = version.map(Version::get);
        let (tenant, script, id) = (&job.tenant, &job.script, &job.id);
        match outcome {
            Outcome::DeadLettered(_) => {
                tracing::warn!(%tenant, %script, job = %id, version, attempt, kind, duration_ms, "Job dead-lettered.")
            }
            Outcome::Failed(_) => {
                tracing::info!(%tenant, %script, job = %id, version, kind, duration_ms, "Synchronous run failed.")
            }
            Outcome::Skipped(_) => {
                tracing::info!(%tenant, %script, job = %id, version, attempt, reason = kind, "Job skipped.")
            }
            Outcome::Ok | Outcome::Retry { .. } => {
                tracing::debug!(%tenant, %script, job = %id, version, attempt, status = status.as_str(), kind, duration_ms, "Run finished.")
            }
        }
    }
}

/// One span per attempt, a child of the publisher's trace: retries and the dead letter of
/// one event share its trace.
pub fn run_span(job: &Job, headers: Option<&HeaderMap>) -> tracing::Span {
    let span = tracing::info_span!(
        crate::observe::telemetry::RUN_SPAN,
        tenant = %job.tenant,
        script = %job.script,
        job = %job.id,
        trigger = %job.trigger,
        attempt = Empty,
        version = Empty,
        outcome = Empty,
    );
    crate::observe::telemetry::set_parent(&span, header(headers, "traceparent"));
    span
}
