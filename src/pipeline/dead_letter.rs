//! Dead letters: a job that cannot succeed, with everything an operator needs to see why
//! and to replay it. Built here, for a job's last failed attempt or for an event that
//! cannot become a job; sent wherever the daemon's `DeadLetters` puts them.

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::attempt::Attempt;
use super::job::{headers_as_json, Job};
use crate::domain::Version;
use crate::engine::Failure;

/// The payload of a dead-letter message.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The tenant whose script failed.
    pub tenant: String,
    /// The script's name.
    pub script: String,
    /// The job that failed (the id of its runs' records).
    pub job_id: String,
    /// The version of the script that failed last, when one ran.
    pub script_version: Option<Version>,
    /// Why the last attempt failed.
    pub failure: Failure,
    /// Attempts made (0 when none could be: an event that could not become a job).
    pub attempts: u32,
    /// When the first attempt was claimed.
    pub first_attempt_at: DateTime<Utc>,
    /// When the last attempt started.
    pub last_attempt_at: DateTime<Utc>,
    /// The job's headers (trace context, replay links, ...).
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The original job payload, byte for byte when it was JSON.
    pub job: Box<RawValue>,
}

impl DeadLetter {
    /// The dead letter of `attempt`, the job's last, which ran `version` from `started_at`
    /// and failed with `failure`.
    pub fn of_attempt(
        attempt: &Attempt<'_>,
        version: Version,
        failure: Failure,
        started_at: DateTime<Utc>,
    ) -> serde_json::Result<DeadLetter> {
        let job: &Job = attempt.job;
        Ok(DeadLetter {
            tenant: job.tenant.clone(),
            script: job.script.clone(),
            job_id: job.id.clone(),
            script_version: Some(version),
            failure,
            attempts: attempt.number,
            first_attempt_at: attempt.first_at,
            last_attempt_at: started_at,
            headers: headers_as_json(attempt.headers),
            job: RawValue::from_string(serde_json::to_string(job)?)?,
        })
    }

    /// The dead letter of an event that could not become job `job_id` of `tenant`'s
    /// `script`: no attempt was made; `job` says where the event is.
    pub fn of_event(
        tenant: &str,
        script: &str,
        job_id: String,
        failure: Failure,
        headers: Option<&HeaderMap>,
        job: &serde_json::Value,
    ) -> serde_json::Result<DeadLetter> {
        let now = Utc::now();
        Ok(DeadLetter {
            tenant: tenant.to_owned(),
            script: script.to_owned(),
            job_id,
            script_version: None,
            failure,
            attempts: 0,
            first_attempt_at: now,
            last_attempt_at: now,
            headers: headers_as_json(headers),
            job: RawValue::from_string(job.to_string())?,
        })
    }
}

/// Why a dead letter could not be sent (the sink's own error).
pub type SendError = Box<dyn std::error::Error + Send + Sync>;

/// Where dead letters go. The daemon's sends them to the dead-letter subject and returns
/// once they are stored.
pub trait DeadLetters: Send + Sync {
    /// Sends `letter`; the job's message `headers` go with it.
    fn send<'a>(
        &'a self,
        letter: &'a DeadLetter,
        headers: Option<&'a HeaderMap>,
    ) -> BoxFuture<'a, Result<(), SendError>>;
}
