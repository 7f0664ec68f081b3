//! The one attempt path: claims a job's attempt, waits for a run slot, plans the run, takes
//! a schedule's overlap lock, runs the script in the engine, decides the `Outcome`, sends a
//! dead letter, tells of the end (`AttemptEnded`) and commits the run record. Job lanes and
//! the fan-out's direct runs both come through here; they only turn its answer into what
//! their message gets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attempt::{self, header, Attempt, Defaults, HandBack, Outcome, Plan};
use super::dead_letter::{DeadLetter, DeadLetters};
use super::held::HeldHere;
use super::job::Job;
use super::records::{BatchError, ClaimTaker, RecordWriter};
use super::report::{AttemptEnded, AttemptStats};
use super::tenants::TenantSlots;
use crate::domain::Overlap;
use crate::domain::{SkipReason, Trigger, Version};
use crate::engine::{Engine, FailureKind, RunResult};
use crate::observe::metrics::Metrics;
use crate::scripts::index::{IndexedScript, ScriptIndex};
use crate::store::{Claim, ClaimRequest, ClaimScope, LockOutcome, RunRecord, Store};

/// How often a schedule job waiting for the overlap lock (queue-one, or a caught-up
/// occurrence) asks again: it starts at most this long after the running one ends. Each
/// ask is three small statements (claim, lock, hand-back), one job per schedule at most.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// How long a claim holds beyond the run's own timeout and those of the runs it may wait
/// behind in its worker (`lease`) before another replica may take the attempt over. A
/// job claimed and still waiting for its slot then is not taken over unless another
/// replica is handed its message, which this one keeps alive.
const CLAIM_MARGIN: Duration = Duration::from_secs(15);

/// How long before the end of the time it was given an attempt run without a claim is
/// sure to have ended (`Executor::hold_unclaimed`): room for a process that stalls.
const UNCLAIMED_MARGIN: Duration = Duration::from_secs(5);

/// How many of its own timeouts a run may wait in its worker's queue, behind the runs
/// handed to the worker before it, before it must start (`ScriptRun::start_by`): one
/// still queued then is not started, and its attempt is handed back. This, not the
/// queue's length (`engine.runs_per_worker`), bounds how long an attempt takes once it
/// has its slot, so the queue can be deep without the bound growing with it.
const START_WAIT: u32 = 3;

/// How long a run of `timeout` may take once it has its slot: the wait to start
/// (`START_WAIT` timeouts, the script's own, the one known here), then its own timeout.
fn run_bound(timeout: Duration) -> Duration {
    timeout.saturating_mul(START_WAIT + 1)
}

/// A claim's lease for a run of `timeout`: the run's bound and a margin.
fn lease(timeout: Duration) -> Duration {
    run_bound(timeout).saturating_add(CLAIM_MARGIN)
}

/// A job waits for one of these before it runs: its tenant's permit, then the engine's.
pub type Slot = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// What an executor is made of.
pub struct Parts {
    /// The scripts at their current versions.
    pub index: Arc<ScriptIndex>,
    /// Where scripts run.
    pub engine: Arc<Engine>,
    /// Pinned versions' sources and schedule locks.
    pub store: Store,
    /// Batched run records; an attempt ends once its record is committed.
    pub records: RecordWriter,
    /// Claims of any attempt (job lanes).
    pub claims: ClaimTaker,
    /// Claims of first attempts only (direct runs from the fan-out).
    pub first_claims: ClaimTaker,
    /// Where dead letters go.
    pub letters: Arc<dyn DeadLetters>,
    /// Limits and retry policy under each script's own.
    pub defaults: Defaults,
    /// Each tenant's share of the engine.
    pub tenant_slots: TenantSlots,
    /// The counters attempts are told to.
    pub stats: Arc<AttemptStats>,
    /// The daemon's metrics.
    pub metrics: Arc<Metrics>,
    /// The daemon's shutdown signal: jobs waiting for a slot are handed back.
    pub stop: CancellationToken,
}

/// Runs attempts (see the module's doc).
pub struct Executor {
    parts: Parts,
    /// One permit per engine slot: a job waits here, not in the engine's queue, so that on
    /// shutdown the jobs not yet started are handed back at once.
    slots: Arc<Semaphore>,
    /// The jobs held here from their claim until their attempt has ended.
    held: HeldHere,
}

impl Executor {
    pub fn new(parts: Parts) -> Executor {
        // Runs queued behind each worker's current one keep it busy while results travel
        // back.
        let slots = Arc::new(Semaphore::new(parts.engine.slots()));
        Executor {
            parts,
            slots,
            held: HeldHere::default(),
        }
    }

    /// The counters attempts are told to.
    pub fn stats(&self) -> &AttemptStats {
        &self.parts.stats
    }

    /// The daemon's shutdown signal.
    pub fn stopping(&self) -> &CancellationToken {
        &self.parts.stop
    }

    /// Claims the next attempt of `job` (or its first only, for `ClaimScope::FirstOnly`);
    /// the claim's lease covers the run's timeout, the wait behind the other runs queued in
    /// its worker, and a margin. A claim won is held here until `run` or `release` ends
    /// it: while no attempt of the job is held here, a claim stored under this replica's
    /// name is one whose answer was lost, and is taken back at once.
    pub async fn claim(&self, job: &Job, scope: ClaimScope) -> Result<Claim, BatchError> {
        let timeout = self.timeout_of(job);
        let request = ClaimRequest {
            job_id: job.id.clone(),
            tenant: job.tenant.clone(),
            lease: lease(timeout),
            idle_here: self.held.hold(&job.id),
        };
        let claim = match scope {
            ClaimScope::Next => self.parts.claims.claim(request).await,
            ClaimScope::FirstOnly => self.parts.first_claims.claim(request).await,
        };
        if !matches!(claim, Ok(Claim::Won { .. })) {
            self.held.let_go(&job.id);
        }
        claim
    }

    /// Holds the first attempt of `job` without claiming it, for a caller that knows no
    /// replica ran or runs the job and none can get it for `within` from now: true if no
    /// attempt of the job is held here and, started within the slot wait, the run is sure
    /// to have ended by then (its bound and a margin), else nothing is held. `run` or
    /// `let_go` ends the hold.
    pub fn hold_unclaimed(&self, job: &Job, within: Duration) -> bool {
        let bound = run_bound(self.timeout_of(job));
        if bound.saturating_add(UNCLAIMED_MARGIN) > within {
            return false;
        }
        if self.held.hold(&job.id) {
            return true;
        }
        self.held.let_go(&job.id);
        false
    }

    /// Lets go of `job`, held without a claim and not run.
    pub fn let_go(&self, job: &Job) {
        self.held.let_go(&job.id);
    }

    /// The timeout of `job`'s script as it is now (the default if it is gone).
    fn timeout_of(&self, job: &Job) -> Duration {
        self.parts
            .index
            .snapshot()
            .get(&job.tenant, &job.script)
            .map_or(self.parts.defaults.limits.timeout, |s| {
                s.limits(&self.parts.defaults.limits).timeout
            })
    }

    /// Hands back attempt `number` of `job`, claimed and not run: whoever gets the job
    /// next runs it, now rather than at the end of the lease.
    pub async fn release(&self, job: &Job, number: u32) {
        self.parts
            .claims
            .release(&job.id, &job.tenant, number)
            .await;
        self.held.let_go(&job.id);
    }

    /// One of the tenant's run permits, then one of the engine's; none once stopping.
    pub async fn slot(&self, tenant: &str) -> Option<Slot> {
        let wait = async {
            let own = self.parts.tenant_slots.acquire(tenant).await?;
            let engine = self.slots.clone().acquire_owned().await.ok()?;
            Some((own, engine))
        };
        tokio::select! {
            slot = wait => slot,
            _ = self.parts.stop.cancelled() => None,
        }
    }

    /// Runs the claimed (or held unclaimed) `attempt` in the `slot` it holds, within the
    /// job's span: plans it, runs it, decides and records its outcome. An attempt that ends
    /// without a record is handed back, its claim released (for one never claimed, the
    /// hand-back opens the job's first attempt).
    pub async fn run(&self, attempt: Attempt<'_>, slot: Slot) -> Result<Outcome, HandBack> {
        let ended = self.run_claimed(&attempt, slot).await;
        if ended.is_err() {
            self.release(attempt.job, attempt.number).await;
        } else {
            self.held.let_go(&attempt.job.id);
        }
        ended
    }

    async fn run_claimed(&self, attempt: &Attempt<'_>, slot: Slot) -> Result<Outcome, HandBack> {
        let job = attempt.job;
        let span = tracing::Span::current();
        span.record("attempt", attempt.number);
        // What the job runs is decided when it can start, so a disable or deploy made
        // while it waited for its slot takes effect.
        let current = self
            .parts
            .index
            .snapshot()
            .get(&job.tenant, &job.script)
            .cloned();
        let plan = match attempt::plan(
            job,
            current.as_ref(),
            &self.parts.store,
            &self.parts.defaults,
        )
        .await
        {
            Ok(Ok(plan)) => plan,
            Ok(Err(reason)) => return self.skip(attempt, job.version, reason).await,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Cannot load the pinned version; the job will come back.");
                return Err(HandBack::SOON);
            }
        };
        let locked = match self.overlap_lock(job, &plan).await {
            Lock::Free => false,
            Lock::Taken => true,
            Lock::Busy => {
                let version = Some(plan.script.version);
                return self.skip(attempt, version, SkipReason::Overlap).await;
            }
            Lock::Wait(hand_back) => return Err(hand_back),
        };
        let started_at = Utc::now();
        if let (Some(at), 1) = (job.scheduled_at, attempt.number) {
            let delay = (started_at - at).to_std().unwrap_or_default();
            self.parts.metrics.schedule_started(delay);
        }
        // Bounded, so that the attempt is sure to end within its lease, or the time it may
        // go without a claim (`run_bound`).
        let start_by = Instant::now() + plan.limits.timeout.saturating_mul(START_WAIT);
        let (result, trace_id) = self.execute(attempt, &plan, slot, Some(start_by)).await;
        if matches!(&result.outcome, Err(f) if f.kind == FailureKind::NotStarted) {
            // Not run: nothing to record. The attempt is handed back, to run when it can
            // start in time; its schedule lock, if any, goes with it.
            tracing::warn!(job = %job.id, attempt = attempt.number, "A run waited too long behind others in its engine worker and was not started; its job comes back.");
            let kind = Some(FailureKind::NotStarted.as_str());
            self.parts
                .metrics
                .run_finished(&job.tenant, "not_started", kind, None);
            if locked {
                self.unlock(job).await;
            }
            return Err(HandBack::SOON);
        }
        let outcome = plan.decide(&result, attempt.number);
        if let Outcome::DeadLettered(failure) = &outcome {
            self.dead_letter(attempt, &plan, failure, started_at)
                .await?;
        }
        let record = self.ended(attempt, &plan, &outcome, &result, started_at, trace_id);
        let committed = self.commit(record).await;
        if locked && !matches!(outcome, Outcome::Retry { .. }) {
            self.unlock(job).await;
        }
        committed.map(|_| outcome)
    }

    /// Releases `job`'s schedule lock (`overlap_lock`).
    async fn unlock(&self, job: &Job) {
        let store = &self.parts.store;
        if let Err(e) = Box::pin(store.unlock_schedule(&job.tenant, &job.script, &job.id)).await {
            tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Could not release the schedule lock; it expires by itself.");
        }
    }

    async fn dead_letter(
        &self,
        attempt: &Attempt<'_>,
        plan: &Plan,
        failure: &crate::engine::Failure,
        started_at: chrono::DateTime<Utc>,
    ) -> Result<(), HandBack> {
        let job = attempt.job;
        let again = HandBack {
            after: Some(Duration::from_secs(1)),
        };
        let letter = DeadLetter::of_attempt(attempt, plan.version, failure.clone(), started_at)
            .map_err(|_| again)?;
        let span = tracing::info_span!("scriptd.dead_letter", kind = %failure.kind, attempts = attempt.number);
        if let Err(e) = self
            .parts
            .letters
            .send(&letter, attempt.headers)
            .instrument(span)
            .await
        {
            tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Dead-letter publish failed; the job will come back.");
            return Err(again);
        }
        Ok(())
    }

    /// For schedule jobs whose script does not allow overlapping runs: takes the script's
    /// schedule lock (held across retries, released when the job ends, expiring after the
    /// timeout plus a margin if a daemon dies).
    async fn overlap_lock(&self, job: &Job, plan: &Plan) -> Lock {
        let script = &plan.script;
        if job.trigger != Trigger::Schedule || script.overlap == Overlap::Allow {
            return Lock::Free;
        }
        let hold_for = plan.limits.timeout + Duration::from_secs(30);
        let expires_at = Utc::now() + chrono::Duration::from_std(hold_for).unwrap_or_default();
        let queue = script.overlap == Overlap::QueueOne;
        let poll = HandBack {
            after: Some(LOCK_POLL),
        };
        let store = &self.parts.store;
        match Box::pin(store.lock_schedule(&job.tenant, &job.script, &job.id, expires_at, queue))
            .await
        {
            Ok(LockOutcome::Acquired) => Lock::Taken,
            Ok(LockOutcome::Waiting) => Lock::Wait(poll),
            Ok(LockOutcome::Held) if job.catch_up => Lock::Wait(poll),
            Ok(LockOutcome::Held) => Lock::Busy,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %format!("{e:#}"), "Cannot take the schedule lock; the job will come back.");
                Lock::Wait(HandBack::SOON)
            }
        }
    }

    /// Runs `job` at once in the `slot` it holds, for an HTTP request: the current version
    /// of `script`, under its limits, in the job's span. It is not claimed (nothing
    /// redelivers a request), not retried and not dead-lettered: a failure is answered. Its
    /// record, with the request as its input, is committed before this returns the run's id.
    /// `Err` is a script disabled meanwhile (`None`) or a record not written.
    pub async fn run_now(
        &self,
        job: &Job,
        script: &Arc<IndexedScript>,
        headers: Option<&async_nats::HeaderMap>,
        slot: Slot,
    ) -> Result<(i64, RunResult), Option<HandBack>> {
        let started_at = Utc::now();
        let attempt = Attempt {
            job,
            number: 1,
            first_at: started_at,
            headers,
            unclaimed: false,
        };
        let span = tracing::Span::current();
        span.record("attempt", 1);
        let plan =
            match attempt::plan(job, Some(script), &self.parts.store, &self.parts.defaults).await {
                Ok(Ok(plan)) => plan,
                _ => return Err(None),
            };
        // Its caller waits, and nothing redelivers it: it waits for its turn unbounded.
        let (result, trace_id) = self.execute(&attempt, &plan, slot, None).await;
        let outcome = match &result.outcome {
            Ok(_) => Outcome::Ok,
            Err(failure) => Outcome::Failed(failure.clone()),
        };
        let mut record = self.ended(&attempt, &plan, &outcome, &result, started_at, trace_id);
        record.input = serde_json::from_str(job.event.get()).ok().map(|v| kept(&v));
        let Some(id) = self.commit(record).await.map_err(Some)? else {
            // A batch holding an HTTP run answers every record's id (`Store::insert_runs`).
            tracing::error!(job = %job.id, "A synchronous run's record was written without its id.");
            return Err(Some(HandBack::SOON));
        };
        Ok((id, result))
    }

    /// Runs `plan` for `attempt` in the engine, within the run's span, holding `slot` until
    /// the run ends (or, past `start_by` still queued in its worker, is not started); with
    /// the id of the trace the run belongs to, if any.
    async fn execute(
        &self,
        attempt: &Attempt<'_>,
        plan: &Plan,
        slot: Slot,
        start_by: Option<Instant>,
    ) -> (RunResult, Option<String>) {
        let span = tracing::Span::current();
        span.record("version", plan.version.get());
        self.parts.metrics.run_started();
        // What the script publishes continues this run's span when spans are exported,
        // else the trace of the event (or request).
        let traceparent = crate::observe::telemetry::traceparent_of(&span)
            .or_else(|| header(attempt.headers, "traceparent").map(str::to_owned));
        let trace_id = traceparent
            .as_deref()
            .and_then(crate::observe::telemetry::trace_id);
        let mut run = plan.run(attempt, traceparent);
        run.start_by = start_by;
        let result = Box::pin(self.parts.engine.run(run)).await;
        drop(slot);
        (result, trace_id)
    }

    /// Tells of the end of a run of `plan` (counters, metrics, span, log line) and makes
    /// its record, in the trace `trace_id`.
    fn ended(
        &self,
        attempt: &Attempt<'_>,
        plan: &Plan,
        outcome: &Outcome,
        result: &RunResult,
        started_at: chrono::DateTime<Utc>,
        trace_id: Option<String>,
    ) -> RunRecord {
        AttemptEnded {
            job: attempt.job,
            attempt: attempt.number,
            version: Some(plan.version),
            outcome,
            kind: result.outcome.as_ref().err().map(|f| f.kind.as_str()),
            took: Some(result.duration),
        }
        .emit(&self.parts.stats, &self.parts.metrics);
        let mut record = run_record(
            attempt,
            Some(plan.version),
            outcome,
            Some(result),
            started_at,
        );
        record.trace_id = trace_id;
        record
    }

    /// Records `attempt` as skipped for `reason`, and tells of it.
    async fn skip(
        &self,
        attempt: &Attempt<'_>,
        version: Option<Version>,
        reason: SkipReason,
    ) -> Result<Outcome, HandBack> {
        let outcome = Outcome::Skipped(reason);
        AttemptEnded {
            job: attempt.job,
            attempt: attempt.number,
            version,
            outcome: &outcome,
            kind: Some(reason.as_str()),
            took: None,
        }
        .emit(&self.parts.stats, &self.parts.metrics);
        let record = run_record(attempt, version, &outcome, None, Utc::now());
        self.commit(record).await.map(|_| outcome)
    }

    /// Writes the record; only a committed record ends the attempt. The run's id, if its
    /// batch was asked for ids (`RecordWriter::write`).
    async fn commit(&self, record: RunRecord) -> Result<Option<i64>, HandBack> {
        // Boxed, as the engine's run: the largest futures of an attempt (see `bus::pull`).
        let written = Box::pin(self.parts.records.write(record)).await;
        if written.is_ok() {
            self.parts
                .stats
                .recorded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        written.map_err(|e| {
            self.parts
                .stats
                .returned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "Run record not written; the job will run again.");
            HandBack::SOON
        })
    }
}

/// Where a job stands with its schedule's overlap lock.
enum Lock {
    /// The job needs none.
    Free,
    /// This job holds it now.
    Taken,
    /// Another job holds it and this one is skipped.
    Busy,
    /// This job waits for it (or it could not be asked for).
    Wait(HandBack),
}

/// The run record of `attempt`, ended with `outcome` (after `result`, when it ran).
fn run_record(
    attempt: &Attempt<'_>,
    version: Option<Version>,
    outcome: &Outcome,
    result: Option<&RunResult>,
    started_at: chrono::DateTime<Utc>,
) -> RunRecord {
    let job = attempt.job;
    let failure = result.and_then(|r| r.outcome.as_ref().err());
    let (kind, message) = match outcome {
        Outcome::Skipped(reason) => (
            Some(reason.as_str().to_owned()),
            Some(reason.message().to_owned()),
        ),
        _ => (
            failure.map(|f| f.kind.as_str().to_owned()),
            failure.map(|f| f.message.clone()),
        ),
    };
    RunRecord {
        tenant: job.tenant.clone(),
        script: job.script.clone(),
        version,
        job_id: job.id.clone(),
        attempt: attempt.number as i32,
        trigger: job.trigger,
        subject: job.subject.clone(),
        event_id: job.event_id.clone(),
        status: outcome.status(),
        failure_kind: kind,
        failure_message: message,
        failure_stack: failure.and_then(|f| f.stack.clone()),
        logs: result
            .map(|r| serde_json::to_value(&r.logs).unwrap_or_default())
            .unwrap_or_else(|| serde_json::Value::Array(vec![])),
        logs_truncated: result.is_some_and(|r| r.logs_truncated),
        cold_start: result.is_some_and(|r| r.cold_start),
        started_at,
        duration_ms: result.map_or(0.0, |r| r.duration.as_secs_f64() * 1000.0),
        scheduled_at: job.scheduled_at,
        input_ref: job.input_ref.clone(),
        result: result.and_then(|r| r.outcome.as_ref().ok()).map(kept),
        input: None,
        trace_id: None,
        unclaimed: attempt.unclaimed,
    }
}

/// A return value as its run record keeps it: itself up to `RESULT_KEPT` bytes of JSON,
/// else a note of its size.
fn kept(value: &serde_json::Value) -> serde_json::Value {
    let bytes = json_len(value);
    if bytes <= crate::store::RESULT_KEPT {
        value.clone()
    } else {
        serde_json::json!({ "scriptd_result_not_kept": { "bytes": bytes, "kept_up_to": crate::store::RESULT_KEPT } })
    }
}

/// The length of `value` written as JSON, counted without writing it anywhere.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a `Value` always serialises.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_covers_the_wait_to_start_and_the_run() {
        let five = Duration::from_secs(5);
        assert_eq!(lease(five), Duration::from_secs(3 * 5 + 5 + 15));
        assert_eq!(lease(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn a_record_keeps_a_small_result_and_notes_the_size_of_a_large_one() {
        let small = serde_json::json!({ "total": 6 });
        assert_eq!(kept(&small), small);
        let large = serde_json::json!("x".repeat(crate::store::RESULT_KEPT));
        let note = kept(&large);
        assert_eq!(
            note["scriptd_result_not_kept"]["bytes"],
            crate::store::RESULT_KEPT + 2
        );
    }
}
