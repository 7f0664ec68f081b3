//! Dead letters: a job that cannot succeed, with everything an operator needs to see why
//! and to replay it, published to `<dlq_prefix>.<tenant>.<script>` in its own stream.

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::NatsConfig;
use crate::engine::Failure;

/// The payload of a dead-letter message.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub tenant: String,
    pub script: String,
    pub job_id: String,
    /// The version of the script that failed last, when one ran.
    pub script_version: Option<u64>,
    pub failure: Failure,
    pub attempts: u32,
    pub first_attempt_at: DateTime<Utc>,
    pub last_attempt_at: DateTime<Utc>,
    /// The job's headers (trace context, replay links, ...).
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The original job payload, byte for byte when it was JSON.
    pub job: Box<RawValue>,
}

/// Publishes a dead letter and waits for the stream's acknowledgement. Its message id is
/// derived from the job's, so publishing the same dead letter twice stores it once.
pub async fn publish(
    js: &jetstream::Context,
    config: &NatsConfig,
    letter: &DeadLetter,
    job_headers: Option<&HeaderMap>,
) -> anyhow::Result<u64> {
    let mut headers = HeaderMap::new();
    if let Some(original) = job_headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
    }
    headers.insert("Nats-Msg-Id", format!("dlq-{}", letter.job_id).as_str());
    headers.insert("Scriptd-Failure-Kind", letter.failure.kind.as_str());
    headers.insert("Scriptd-Attempts", letter.attempts.to_string().as_str());
    headers.insert("Scriptd-Job-Id", letter.job_id.as_str());
    let payload = Bytes::from(serde_json::to_vec(letter)?);
    let ack = js
        .publish_with_headers(
            config.dlq_subject(&letter.tenant, &letter.script),
            headers,
            payload,
        )
        .await?
        .await?;
    Ok(ack.sequence)
}
