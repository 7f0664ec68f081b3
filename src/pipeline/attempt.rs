//! What one attempt is and how it can end: the `Attempt` (a job, which attempt, what it
//! inherits from its message), the `Plan` of what it runs (version, source, limits, retry
//! policy) and the `Outcome` decided for it. Job runs, direct runs, schedule runs, replays
//! and the dead-letter dry run all plan and decide through here.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};

use super::job::Job;
use crate::domain::{RunStatus, SkipReason, Version};
use crate::engine::{Failure, Limits, RunResult, ScriptRun};
use crate::retry::RetryPolicy;
use crate::scripts::index::IndexedScript;
use crate::store::Store;

/// One attempt of one job, as claimed.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    /// The job.
    pub job: &'a Job,
    /// Which attempt, 1 for the first.
    pub number: u32,
    /// When the job's first attempt was claimed.
    pub first_at: DateTime<Utc>,
    /// The job's message headers: its trace context and chain depth.
    pub headers: Option<&'a HeaderMap>,
    /// The attempt runs without a claim (`Executor::hold_unclaimed`): if it ends the job,
    /// its record writes no claim row either, and the job's runs tell it ended.
    pub unclaimed: bool,
}

/// How an attempt ended, once decided: what its record says and what its message gets.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The handler returned a value.
    Ok,
    /// The run failed and the job's next attempt is due after this long.
    Retry {
        /// The backoff delay.
        after: Duration,
    },
    /// The run failed for the last time; the job went to the dead-letter subject.
    DeadLettered(Failure),
    /// The attempt was recorded without running.
    Skipped(SkipReason),
    /// The run failed and is not retried: a synchronous run, answered at once.
    Failed(Failure),
}

impl Outcome {
    /// The status its run record is stored with.
    pub fn status(&self) -> RunStatus {
        match self {
            Outcome::Ok => RunStatus::Ok,
            Outcome::Retry { .. } => RunStatus::Retrying,
            Outcome::DeadLettered(_) => RunStatus::DeadLettered,
            Outcome::Skipped(_) => RunStatus::Skipped,
            Outcome::Failed(_) => RunStatus::Failed,
        }
    }
}

/// An attempt that ended without a record (its lock or pinned version could not be read,
/// its dead letter or record not written, the daemon stopping): its message is handed back
/// and the attempt runs again, on this replica or another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandBack {
    /// When it may come back; none for at once.
    pub after: Option<Duration>,
}

impl HandBack {
    /// Back after a short pause: the service that failed may need a moment.
    pub const SOON: HandBack = HandBack {
        after: Some(Duration::from_secs(2)),
    };
}

/// What an attempt runs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The script at its current version, as the index holds it.
    pub script: Arc<IndexedScript>,
    /// The version that runs: the current one, or the one a replay pinned.
    pub version: Version,
    /// That version's source.
    pub source: Arc<str>,
    /// The script's limits over the defaults.
    pub limits: Limits,
    /// The script's retry policy over the defaults.
    pub policy: RetryPolicy,
}

/// The defaults under each script's own limits and retry policy.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// `[engine.limits]`.
    pub limits: Limits,
    /// `[retry]`.
    pub retry: RetryPolicy,
}

/// Decides what `job` runs, given its script as the index holds it now: its current
/// version, or the version a replay pinned, read from `store`. `Ok(Err(reason))` is an
/// attempt to record as skipped: a script deleted or disabled, or a pinned version that
/// no longer exists (running another version than the one asked for would be wrong, and
/// retrying cannot bring it back). `Err` is a store that could not answer.
pub async fn plan(
    job: &Job,
    current: Option<&Arc<IndexedScript>>,
    store: &Store,
    defaults: &Defaults,
) -> anyhow::Result<Result<Plan, SkipReason>> {
    let Some(script) = current.filter(|s| s.enabled) else {
        return Ok(Err(SkipReason::ScriptGone));
    };
    let (version, source) = match job.version.filter(|v| *v != script.version) {
        None => (script.version, script.source.clone()),
        // Boxed: a query's future is large (see `bus::pull`).
        Some(pinned) => {
            match Box::pin(store.version_source(&job.tenant, &job.script, pinned)).await? {
                Some(source) => (pinned, Arc::from(source.javascript)),
                None => return Ok(Err(SkipReason::VersionMissing)),
            }
        }
    };
    Ok(Ok(Plan {
        limits: script.limits(&defaults.limits),
        policy: script.retry_policy(&defaults.retry),
        script: script.clone(),
        version,
        source,
    }))
}

impl Plan {
    /// The engine run of `attempt` under this plan. `traceparent` is the trace what the
    /// script publishes continues.
    pub fn run(&self, attempt: &Attempt<'_>, traceparent: Option<String>) -> ScriptRun {
        let job = attempt.job;
        ScriptRun {
            tenant: job.tenant.clone(),
            script: job.script.clone(),
            version: self.version,
            source: self.source.clone(),
            input: job.event.clone(),
            attempt: attempt.number,
            limits: self.limits,
            job: job.id.clone(),
            traceparent,
            depth: header(attempt.headers, crate::caps::DEPTH_HEADER)
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
            start_by: None,
        }
    }

    /// The outcome of attempt number `number` that ended with `result`: ok, or for a
    /// failure another attempt after the retry policy's delay, or the dead letter.
    pub fn decide(&self, result: &RunResult, number: u32) -> Outcome {
        match &result.outcome {
            Ok(_) => Outcome::Ok,
            Err(failure) => match self.policy.retry_after(failure, number) {
                Some(after) => Outcome::Retry { after },
                None => Outcome::DeadLettered(failure.clone()),
            },
        }
    }
}

/// The first value of header `name`, if the message has it.
pub fn header<'m>(headers: Option<&'m HeaderMap>, name: &str) -> Option<&'m str> {
    headers?.get(name).map(|v| v.as_str())
}
