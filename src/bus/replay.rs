//! Replays of dead letters: a fresh job (new message id, so JetStream's duplicate window
//! cannot swallow it) carrying the original event, the version to run, and headers that
//! link it to the dead letter it came from and to every earlier replay in its chain.

use std::str::FromStr;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use super::dlq::StoredLetter;
use super::error::{BusError, Doing, Result};
use super::NatsConfig;
use crate::domain::Trigger;
use crate::pipeline::job::Job;

/// The dead letter this job replays (its stream sequence).
pub const REPLAY_OF: &str = "Scriptd-Replay-Of";
/// Every dead letter in the chain of replays, oldest first, comma-separated.
pub const REPLAY_CHAIN: &str = "Scriptd-Replay-Chain";
/// The job id of the first job of the chain.
pub const ORIGINAL_JOB: &str = "Scriptd-Original-Job";

/// Which version a replay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionChoice {
    /// The script's current version when the replay runs.
    Latest,
    /// The version that failed.
    Pinned,
    /// This version.
    Exactly(crate::domain::Version),
}

impl FromStr for VersionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" => Ok(VersionChoice::Latest),
            "pinned" => Ok(VersionChoice::Pinned),
            n => n
                .parse()
                .map(VersionChoice::Exactly)
                .map_err(|_| format!("--version takes latest, pinned or a number, not {n:?}")),
        }
    }
}

/// The replay job of a dead letter, and the headers that go with it.
pub fn replay_job(stored: &StoredLetter, choice: VersionChoice) -> Result<(Job, HeaderMap)> {
    let letter = &stored.letter;
    let original: Job = serde_json::from_str(letter.job.get()).map_err(|_| {
        BusError::Letter(format!(
            "dead letter {} holds no job to replay ({}: {})",
            stored.sequence, letter.failure.kind, letter.failure.message
        ))
    })?;
    let version = match choice {
        VersionChoice::Latest => None,
        VersionChoice::Pinned => Some(letter.script_version.ok_or_else(|| {
            BusError::Letter(format!(
                "dead letter {} names no version to pin",
                stored.sequence
            ))
        })?),
        VersionChoice::Exactly(n) => Some(n),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let job = Job {
        id: format!("rp-{}-{nanos}", stored.sequence),
        trigger: Trigger::Replay,
        version,
        ..original
    };
    let header = |name: &str| stored.headers.get(name).map(|v| v.to_string());
    let chain = match header(REPLAY_CHAIN) {
        Some(earlier) => format!("{earlier},{}", stored.sequence),
        None => stored.sequence.to_string(),
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", job.id.as_str());
    headers.insert(REPLAY_OF, stored.sequence.to_string().as_str());
    headers.insert(REPLAY_CHAIN, chain.as_str());
    headers.insert(
        ORIGINAL_JOB,
        header(ORIGINAL_JOB)
            .unwrap_or_else(|| letter.job_id.clone())
            .as_str(),
    );
    if let Some(parent) = header("traceparent") {
        headers.insert("traceparent", parent.as_str());
    }
    Ok((job, headers))
}

/// Publishes a replay job and waits for JetStream to store it.
pub async fn publish(
    js: &jetstream::Context,
    config: &NatsConfig,
    job: &Job,
    headers: HeaderMap,
) -> Result<u64> {
    let subject = config.job_subject(&job.tenant, &job.script);
    let doing = || format!("publishing replay job {} to {subject}", job.id);
    let payload = serde_json::to_vec(job).doing(doing)?;
    let ack = js
        .publish_with_headers(subject.clone(), headers, Bytes::from(payload))
        .await
        .doing(doing)?
        .await
        .doing(doing)?;
    Ok(ack.sequence)
}
