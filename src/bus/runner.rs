//! The runner: takes jobs, runs the script's current version in the engine, records the
//! attempt, and turns the retry policy's decision into ack, nak-with-delay, or dead letter
//! then ack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use chrono::Utc;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::Instrument;

use super::dlq::{self, DeadLetter};
use super::job::{headers_as_json, Job};
use super::NatsConfig;
use crate::engine::{Engine, Failure, Limits, RunResult, ScriptRun};
use crate::observe::metrics::Metrics;
use crate::pipeline::records::{ClaimTaker, RecordWriter};
use crate::pipeline::retry::{Decision, RetryPolicy};
use crate::schedule::Overlap;
use crate::scripts::index::ScriptIndex;
use crate::store::{
    Claim, ClaimRequest, LockOutcome, RunRecord, RunStatus, SkipReason, Store, Trigger,
};

/// Counters of the runner since start.
#[derive(Debug, Default)]
pub struct RunnerStats {
    /// Attempts that ended ok.
    pub succeeded: AtomicU64,
    /// Attempts that failed and will be retried.
    pub retried: AtomicU64,
    /// Jobs sent to the dead-letter subject.
    pub dead_lettered: AtomicU64,
    /// Attempts recorded as skipped (see `SkipReason`).
    pub skipped: AtomicU64,
    /// Jobs handed back unfinished (shutdown, or their record could not be written).
    pub returned: AtomicU64,
    /// Deliveries of a job whose attempt another replica held: handed back to wait.
    pub held_elsewhere: AtomicU64,
}

/// Runs jobs: claims their attempt, runs the script in the engine, records the attempt and
/// settles the message (direct runs from the fan-out go through it too).
pub struct Runner {
    /// Where dead letters are published.
    pub js: jetstream::Context,
    /// The `[nats]` settings (subjects, streams).
    pub config: NatsConfig,
    /// The scripts at their current versions.
    pub index: Arc<ScriptIndex>,
    /// Where scripts run.
    pub engine: Arc<Engine>,
    /// Batched run records; a message is settled once its record is committed.
    pub records: RecordWriter,
    /// Claims of job attempts (any attempt: job lanes).
    pub claims: ClaimTaker,
    /// Claims of first attempts (direct runs from the fan-out).
    pub first_claims: ClaimTaker,
    /// Pinned versions' sources and schedule locks.
    pub store: Store,
    /// The default limits, under each script's own.
    pub limits: Limits,
    /// The default retry policy, under each script's own.
    pub retry: RetryPolicy,
    /// How long JetStream waits for an ack: long runs send progress before it ends.
    pub ack_wait: Duration,
    /// The runner's counters.
    pub stats: Arc<RunnerStats>,
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// One permit per engine worker: a job waits here, not in the engine's queue, so that
    /// on shutdown the jobs not yet started are handed back at once.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Each tenant's share of the engine: its runs take one of these before an engine slot,
    /// so the engine's (first come, first served) queue holds few runs of any one tenant.
    pub tenant_slots: super::lanes::TenantSlots,
    /// The daemon's shutdown signal.
    pub stop: CancellationToken,
    /// The jobs being handled here.
    pub in_flight: super::Claims,
}

/// A message's fate once its handling ends.
#[derive(Debug, PartialEq)]
pub(crate) enum Settle {
    Ack,
    /// The attempt failed, is recorded as `retrying`, and the next one is due after this delay.
    Retry(Duration),
    /// Handed back unfinished (shutdown, a service unavailable): comes back after the delay.
    Nak(Option<Duration>),
    Term,
}

/// The attempt a replica claimed and now runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Claimed {
    /// The attempt claimed, 1 for the first.
    pub attempt: u32,
    /// When the job's first attempt was claimed.
    pub first_at: chrono::DateTime<Utc>,
}

/// How often a schedule job waiting for the overlap lock (queue-one, or a caught-up
/// occurrence) asks again: it starts at most this long after the running one ends. Each
/// ask is three small statements (claim, lock, hand-back), one job per schedule at most.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// How one attempt ended, as `Runner::report` tells it.
struct Finished<'a> {
    job: &'a Job,
    attempt: u32,
    version: Option<u64>,
    status: RunStatus,
    /// The failure kind, or a skip's reason.
    kind: Option<&'a str>,
    /// How long the run took (none for a skip).
    took: Option<Duration>,
}

/// How long a claim holds beyond twice the run's timeout (a claimed run may wait for one
/// run ahead of it in its worker) before another replica may take the attempt over. A
/// job claimed and still waiting for its slot then is not taken over unless another
/// replica is handed its message, which this one keeps alive.
const CLAIM_MARGIN: Duration = Duration::from_secs(15);

/// A job waits for one of these before it runs: its tenant's permit, then the engine's.
pub(crate) type Slot = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// The header of a job whose attempt is due later (a retry queued by a direct run): Unix
/// time in milliseconds.
pub const RETRY_AT_HEADER: &str = "Scriptd-Retry-At";

impl Runner {
    /// Handles one job message. `hard_stop` cancels a run still going at the end of the
    /// shutdown grace period: its message is handed back for another replica.
    pub async fn handle(&self, msg: jetstream::Message, hard_stop: CancellationToken) {
        let Some(_in_flight) = self.in_flight.claim(&msg) else {
            tracing::debug!(subject = %msg.subject, "A job already being handled here was delivered again; ignored.");
            return;
        };
        let settle = tokio::select! {
            settle = super::keeping_alive(&msg, self.ack_wait, self.process(&msg)) => settle,
            _ = hard_stop.cancelled() => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                Settle::Nak(None)
            }
        };
        let result = match settle {
            Settle::Ack => msg.ack().await,
            Settle::Retry(delay) => msg.ack_with(AckKind::Nak(Some(delay))).await,
            Settle::Nak(delay) => msg.ack_with(AckKind::Nak(delay)).await,
            Settle::Term => msg.ack_with(AckKind::Term).await,
        };
        if let Err(e) = result {
            tracing::warn!(subject = %msg.subject, error = %e, "Could not settle a job message; it will be redelivered.");
        }
    }

    async fn process(&self, msg: &jetstream::Message) -> Settle {
        if let Some(due) = header(msg.headers.as_ref(), RETRY_AT_HEADER).and_then(retry_due) {
            // A retry queued by a direct run whose delay is not over: it waits in JetStream.
            // Attempts come from the records, so this delivery uses none up.
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
        self.process_job(msg, job).instrument(span).await
    }

    async fn process_job(&self, msg: &jetstream::Message, job: Job) -> Settle {
        // The claim says which attempt this is, and lets one replica run it: a redelivery
        // may follow a retry, a hand-back at shutdown, a crash or a lost ack, and NATS
        // servers sometimes deliver a message to two replicas at once (nats-server#4460).
        // It is taken before the engine slot: claimed once the slot had come, slots idled
        // through claims' round trips and a flood's overflow into the lanes fed on itself
        // (3-script throughput fell to a third). The lease covers the wait: the message is
        // kept alive meanwhile, so no other replica is handed the job unless this one dies.
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        let claimed = match self.claims.claim(self.claim_request(&job)).await {
            Ok(Claim::Won {
                attempt,
                first_at,
                taken_over,
            }) => {
                if taken_over {
                    tracing::warn!(job = %job.id, attempt, "Attempt taken over: the replica that claimed it did not record it within its lease.");
                }
                Claimed { attempt, first_at }
            }
            Ok(Claim::Ended) => {
                tracing::info!(job = %job.id, delivered, "Job delivered again after it ended; acknowledged without running it.");
                tracing::Span::current().record("outcome", "already_ended");
                return Settle::Ack;
            }
            Ok(Claim::Held { until }) => {
                self.stats.held_elsewhere.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(job = %job.id, delivered, "Another replica holds this job's attempt; it comes back later.");
                return Settle::Nak(Some(held_wait(until)));
            }
            Ok(Claim::Later { .. }) => return Settle::Nak(Some(Duration::from_secs(1))),
            Err(e) => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %job.id, error = %e, "Cannot claim the job's attempt; it will come back.");
                return Settle::Nak(Some(Duration::from_secs(2)));
            }
        };
        // What the job runs is decided when it can start, so a disable or deploy made
        // while it waited for its slot takes effect.
        let slot = tokio::select! {
            slot = self.engine_slot(&job.tenant) => slot,
            _ = self.stop.cancelled() => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        let Some(slot) = slot else {
            self.claims
                .release(&job.id, &job.tenant, claimed.attempt)
                .await;
            return Settle::Nak(None);
        };
        self.attempt(msg.headers.as_ref(), &job, claimed, slot)
            .await
    }

    /// What claiming the next attempt of `job` asks for: its lease covers the run's
    /// timeout, the wait behind one run in its worker, and a margin.
    pub(crate) fn claim_request(&self, job: &Job) -> ClaimRequest {
        let timeout = self
            .index
            .snapshot()
            .get(&job.tenant, &job.script)
            .map_or(self.limits.timeout, |s| s.limits(&self.limits).timeout);
        ClaimRequest {
            job_id: job.id.clone(),
            tenant: job.tenant.clone(),
            lease: 2 * timeout + CLAIM_MARGIN,
        }
    }

    /// Runs the `claimed` attempt of `job` in the engine `slot` it holds, within the job's
    /// span: looks the script up, runs it, and records the attempt; dead-letters the job
    /// when the retry policy says so. `headers` are the job's (trace context, chain depth).
    /// The returned settlement is what the job's message (or event) gets; an attempt that
    /// does not run and is not recorded hands its claim back.
    pub(crate) async fn attempt(
        &self,
        headers: Option<&HeaderMap>,
        job: &Job,
        claimed: Claimed,
        slot: Slot,
    ) -> Settle {
        let settle = self.run_claimed(headers, job, claimed, slot).await;
        if let Settle::Nak(_) = settle {
            // Not recorded (a lock not free, a pinned version not readable, a dead letter
            // or a record not written): whoever gets the job next runs this attempt, now
            // rather than at the end of the lease.
            self.claims
                .release(&job.id, &job.tenant, claimed.attempt)
                .await;
        }
        settle
    }

    async fn run_claimed(
        &self,
        headers: Option<&HeaderMap>,
        job: &Job,
        claimed: Claimed,
        slot: Slot,
    ) -> Settle {
        let attempt = claimed.attempt;
        let span = tracing::Span::current();
        let script = self.index.snapshot().get(&job.tenant, &job.script).cloned();
        span.record("attempt", attempt);
        let Some(script) = script.filter(|s| s.enabled) else {
            return self.skip(job, attempt, None, SkipReason::ScriptGone).await;
        };
        let locked = match self.overlap_lock(job, attempt, &script).await {
            Ok(locked) => locked,
            Err(settle) => return settle,
        };
        let (version, source) = match self.pinned_source(job, attempt, &script).await {
            Ok(found) => found,
            Err(settle) => return settle,
        };
        let started_at = Utc::now();
        span.record("version", version);
        self.metrics.run_started();
        if let (Some(at), 1) = (job.scheduled_at, attempt) {
            self.metrics
                .schedule_started((started_at - at).to_std().unwrap_or_default());
        }
        let limits = script.limits(&self.limits);
        let policy = script.retry_policy(&self.retry);
        let run = ScriptRun {
            tenant: job.tenant.clone(),
            script: job.script.clone(),
            version,
            source,
            input: job.event.clone(),
            attempt,
            limits,
            job: job.id.clone(),
            // What the script publishes continues this run's span when spans are exported,
            // else the event's trace.
            traceparent: crate::observe::telemetry::traceparent_of(&span)
                .or_else(|| header(headers, "traceparent").map(str::to_owned)),
            depth: header(headers, crate::caps::DEPTH_HEADER)
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
        };
        let result = self.engine.run(run).await;
        drop(slot);
        let decision = policy.decide(result.outcome.as_ref().map(|_| ()), attempt);
        let (status, settle) = match decision {
            Decision::Ack => (RunStatus::Ok, Settle::Ack),
            Decision::Retry(delay) => (RunStatus::Retrying, Settle::Retry(delay)),
            Decision::DeadLetter(failure) => {
                let letter = DeadLetter {
                    tenant: job.tenant.clone(),
                    script: job.script.clone(),
                    job_id: job.id.clone(),
                    script_version: Some(version),
                    failure,
                    attempts: attempt,
                    first_attempt_at: claimed.first_at,
                    last_attempt_at: started_at,
                    headers: headers_as_json(headers),
                    job: match serde_json::to_string(job).map(RawValue::from_string) {
                        Ok(Ok(raw)) => raw,
                        _ => return Settle::Nak(Some(Duration::from_secs(1))),
                    },
                };
                let dead_letter = tracing::info_span!("scriptd.dead_letter", kind = %letter.failure.kind, attempts = attempt);
                if let Err(e) = dlq::publish(&self.js, &self.config, &letter, headers)
                    .instrument(dead_letter)
                    .await
                {
                    tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Dead-letter publish failed; the job will come back.");
                    return Settle::Nak(Some(Duration::from_secs(1)));
                }
                (RunStatus::DeadLettered, Settle::Ack)
            }
        };
        self.report(Finished {
            job,
            attempt,
            version: Some(version),
            status,
            kind: result.outcome.as_ref().err().map(|f| f.kind.as_str()),
            took: Some(result.duration),
        });
        let record = record(
            job,
            attempt,
            Some(version as i32),
            status,
            Some(&result),
            started_at,
        );
        let settled = self.commit(record, settle).await;
        if locked && status != RunStatus::Retrying {
            if let Err(e) = self
                .store
                .unlock_schedule(&job.tenant, &job.script, &job.id)
                .await
            {
                tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Could not release the schedule lock; it expires by itself.");
            }
        }
        settled
    }

    /// One of the tenant's run permits, then one of the engine's.
    pub(crate) async fn engine_slot(&self, tenant: &str) -> Option<Slot> {
        let own = self.tenant_slots.acquire(tenant).await?;
        let engine = self.slots.clone().acquire_owned().await.ok()?;
        Some((own, engine))
    }

    /// For schedule jobs whose script does not allow overlapping runs: takes the script's
    /// schedule lock (held across retries, released when the job ends, expiring after the
    /// timeout plus a margin if a daemon dies). Returns whether this job holds it, or how to
    /// settle the message when it may not run now.
    async fn overlap_lock(
        &self,
        job: &Job,
        attempt: u32,
        script: &crate::scripts::index::IndexedScript,
    ) -> Result<bool, Settle> {
        if job.trigger != Trigger::Schedule || script.overlap == Overlap::Allow {
            return Ok(false);
        }
        let hold_for = script.limits(&self.limits).timeout + Duration::from_secs(30);
        let expires_at = Utc::now() + chrono::Duration::from_std(hold_for).unwrap_or_default();
        let queue = script.overlap == Overlap::QueueOne;
        match self
            .store
            .lock_schedule(&job.tenant, &job.script, &job.id, expires_at, queue)
            .await
        {
            Ok(LockOutcome::Acquired) => Ok(true),
            Ok(LockOutcome::Waiting) => Err(Settle::Nak(Some(LOCK_POLL))),
            Ok(LockOutcome::Held) if job.catch_up => Err(Settle::Nak(Some(LOCK_POLL))),
            Ok(LockOutcome::Held) => {
                let version = Some(script.version);
                Err(self.skip(job, attempt, version, SkipReason::Overlap).await)
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Cannot take the schedule lock; the job will come back.");
                Err(Settle::Nak(Some(Duration::from_secs(2))))
            }
        }
    }

    /// The version a job runs and its source: the current one, or the version a replay
    /// pinned. A pinned version that no longer exists is recorded as skipped
    /// (`version_missing`): running another version than the one asked for would be wrong,
    /// and retrying cannot bring it back.
    async fn pinned_source(
        &self,
        job: &Job,
        attempt: u32,
        script: &crate::scripts::index::IndexedScript,
    ) -> Result<(u64, Arc<str>), Settle> {
        let Some(pinned) = job.version.filter(|v| *v != script.version) else {
            return Ok((script.version, script.source.clone()));
        };
        match self
            .store
            .version_source(&job.tenant, &job.script, pinned as i32)
            .await
        {
            Ok(Some(source)) => Ok((pinned, Arc::from(source))),
            Ok(None) => {
                let version = Some(pinned);
                Err(self
                    .skip(job, attempt, version, SkipReason::VersionMissing)
                    .await)
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Cannot load the pinned version; the job will come back.");
                Err(Settle::Nak(Some(Duration::from_secs(2))))
            }
        }
    }

    /// Records `attempt` of `job` as skipped for `reason`, and reports it: counters,
    /// metrics, the run's span and a log line.
    async fn skip(
        &self,
        job: &Job,
        attempt: u32,
        version: Option<u64>,
        reason: SkipReason,
    ) -> Settle {
        let status = RunStatus::Skipped;
        self.report(Finished {
            job,
            attempt,
            version,
            status,
            kind: Some(reason.as_str()),
            took: None,
        });
        if reason == SkipReason::Overlap {
            self.metrics.schedule_skipped(reason.as_str(), 1);
        }
        let version = version.map(|v| v as i32);
        let mut skipped = record(job, attempt, version, status, None, Utc::now());
        skipped.failure_kind = Some(reason.as_str().into());
        skipped.failure_message = Some(reason.message().into());
        self.commit(skipped, Settle::Ack).await
    }

    /// Reports how an attempt ended: the runner's counters, the metrics, the run's span and
    /// the log line are updated here and nowhere else, so they cannot disagree.
    fn report(&self, finished: Finished<'_>) {
        let Finished {
            job,
            attempt,
            version,
            status,
            kind,
            took,
        } = finished;
        let counter = match status {
            RunStatus::Ok => &self.stats.succeeded,
            RunStatus::Retrying => &self.stats.retried,
            RunStatus::DeadLettered => &self.stats.dead_lettered,
            RunStatus::Skipped => &self.stats.skipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .run_finished(&job.tenant, status.as_str(), kind, took);
        tracing::Span::current().record("outcome", status.as_str());
        let duration_ms = took.map(|t| t.as_secs_f64() * 1000.0);
        match status {
            RunStatus::DeadLettered => {
                tracing::warn!(tenant = %job.tenant, script = %job.script, job = %job.id, version, attempt, kind, duration_ms, "Job dead-lettered.")
            }
            RunStatus::Skipped => {
                tracing::info!(tenant = %job.tenant, script = %job.script, job = %job.id, version, attempt, reason = kind, "Job skipped.")
            }
            RunStatus::Ok | RunStatus::Retrying => {
                tracing::debug!(tenant = %job.tenant, script = %job.script, job = %job.id, version, attempt, status = status.as_str(), kind, duration_ms, "Run finished.")
            }
        }
    }

    /// Writes the record; only a committed record lets the message be settled as decided.
    async fn commit(&self, record: RunRecord, settle: Settle) -> Settle {
        match self.records.write(record).await {
            Ok(()) => settle,
            Err(e) => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "Run record not written; the job will run again.");
                Settle::Nak(Some(Duration::from_secs(2)))
            }
        }
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

fn header<'m>(headers: Option<&'m HeaderMap>, name: &str) -> Option<&'m str> {
    headers?.get(name).map(|v| v.as_str())
}

/// How long until a `Scriptd-Retry-At` time, if it is still ahead.
fn retry_due(value: &str) -> Option<Duration> {
    let at = value.parse::<i64>().ok()?;
    let left = at - Utc::now().timestamp_millis();
    (left > 0).then(|| Duration::from_millis(left as u64))
}

/// One span per attempt, a child of the publisher's trace: retries and the dead letter of
/// one event share its trace.
pub(crate) fn run_span(job: &Job, headers: Option<&HeaderMap>) -> tracing::Span {
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

fn record(
    job: &Job,
    attempt: u32,
    version: Option<i32>,
    status: RunStatus,
    result: Option<&RunResult>,
    started_at: chrono::DateTime<Utc>,
) -> RunRecord {
    let failure: Option<&Failure> = result.and_then(|r| r.outcome.as_ref().err());
    RunRecord {
        tenant: job.tenant.clone(),
        script: job.script.clone(),
        version,
        job_id: job.id.clone(),
        attempt: attempt as i32,
        trigger: job.trigger,
        subject: job.subject.clone(),
        event_id: job.event_id.clone(),
        status,
        failure_kind: failure.map(|f| f.kind.as_str().to_owned()),
        failure_message: failure.map(|f| f.message.clone()),
        failure_stack: failure.and_then(|f| f.stack.clone()),
        logs: result
            .map(|r| serde_json::to_value(&r.logs).unwrap_or_default())
            .unwrap_or_else(|| serde_json::Value::Array(vec![])),
        logs_truncated: result.is_some_and(|r| r.logs_truncated),
        cold_start: result.is_some_and(|r| r.cold_start),
        started_at,
        duration_ms: result.map_or(0.0, |r| r.duration.as_secs_f64() * 1000.0),
        scheduled_at: job.scheduled_at,
    }
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
