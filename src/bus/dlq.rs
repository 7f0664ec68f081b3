//! The dead-letter stream: dead letters published to `<dlq_prefix>.<tenant>.<script>`,
//! listed and read back for operators.

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;

use super::error::{BusError, Doing, Result};
use super::NatsConfig;
use crate::pipeline::dead_letter::{DeadLetter, DeadLetters, SendError};

/// The daemon's `DeadLetters`: the dead-letter subject.
pub struct Publisher {
    /// Where dead letters are published.
    pub js: jetstream::Context,
    /// The `[nats]` settings (the dead-letter prefix).
    pub config: NatsConfig,
}

impl DeadLetters for Publisher {
    fn send<'a>(
        &'a self,
        letter: &'a DeadLetter,
        headers: Option<&'a HeaderMap>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            publish(&self.js, &self.config, letter, headers)
                .await
                .map(drop)
                .map_err(SendError::from)
        })
    }
}

/// Publishes a dead letter and waits for the stream's acknowledgement. Its message id is
/// derived from the job's, so publishing the same dead letter twice stores it once.
pub async fn publish(
    js: &jetstream::Context,
    config: &NatsConfig,
    letter: &DeadLetter,
    job_headers: Option<&HeaderMap>,
) -> Result<u64> {
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
    let subject = config.dlq_subject(&letter.tenant, &letter.script);
    let doing = || {
        format!(
            "publishing the dead letter of job {} to {subject}",
            letter.job_id
        )
    };
    let payload = Bytes::from(serde_json::to_vec(letter).doing(doing)?);
    let ack = js
        .publish_with_headers(subject.clone(), headers, payload)
        .await
        .doing(doing)?
        .await
        .doing(doing)?;
    Ok(ack.sequence)
}

/// A dead letter as stored: its place in the stream and its document.
#[derive(Debug, Serialize)]
pub struct StoredLetter {
    /// Its sequence in the dead-letter stream, as `dlq show` and `dlq replay` take it.
    pub sequence: u64,
    /// The subject it was stored under: `<dlq_prefix>.<tenant>.<script>`.
    pub subject: String,
    /// When JetStream stored it.
    pub stored_at: DateTime<Utc>,
    /// The message's NATS headers: the failed job's own, its message id and the `Scriptd-*` summary
    /// of the failure; a replay takes its trace context and replay links from them.
    #[serde(skip)]
    pub headers: HeaderMap,
    /// The dead letter itself: the job, its failure and its attempts.
    pub letter: DeadLetter,
}

/// Which dead letters to look at.
#[derive(Clone, Debug, Default)]
pub struct LetterFilter {
    /// Only this tenant's dead letters.
    pub tenant: Option<String>,
    /// Only dead letters of scripts with this name.
    pub script: Option<String>,
    /// Only dead letters whose last failure is of this kind (`timeout`, `exception`, ...).
    pub kind: Option<String>,
    /// Only dead letters stored at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl LetterFilter {
    pub fn is_empty(&self) -> bool {
        self.tenant.is_none()
            && self.script.is_none()
            && self.kind.is_none()
            && self.since.is_none()
    }

    fn admits(&self, l: &StoredLetter) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == l.letter.tenant)
            && self.script.as_ref().is_none_or(|s| *s == l.letter.script)
            && self
                .kind
                .as_ref()
                .is_none_or(|k| *k == l.letter.failure.kind.as_str())
            && self.since.is_none_or(|since| l.stored_at >= since)
    }
}

/// The dead-letter stream, with a message an operator can act on when it is missing.
pub async fn stream(
    js: &jetstream::Context,
    config: &NatsConfig,
) -> Result<jetstream::stream::Stream> {
    js.get_stream(config.dlq_stream()).await.map_err(|e| {
        BusError::Stream(format!(
            "the dead-letter stream {} is not there ({e}): has a daemon with these [nats] settings run against {}?",
            config.dlq_stream(),
            config.url
        ))
    })
}

/// One dead letter by stream sequence.
pub async fn get(stream: &jetstream::stream::Stream, sequence: u64) -> Result<StoredLetter> {
    let message = stream.get_raw_message(sequence).await.map_err(|e| {
        BusError::Letter(format!(
            "no dead letter at sequence {sequence} ({e}); `scriptd dlq list` shows what there is"
        ))
    })?;
    let letter: DeadLetter = serde_json::from_slice(&message.payload).map_err(|e| {
        BusError::Letter(format!(
            "sequence {sequence} is not a scriptd dead letter: {e}"
        ))
    })?;
    let nanos = message.time.unix_timestamp_nanos();
    Ok(StoredLetter {
        sequence,
        subject: message.subject.to_string(),
        stored_at: DateTime::from_timestamp_nanos(nanos as i64),
        headers: message.headers,
        letter,
    })
}

/// Dead letters matching `filter`, newest first, at most `limit`.
pub async fn list(
    stream: &mut jetstream::stream::Stream,
    filter: &LetterFilter,
    limit: usize,
) -> Result<Vec<StoredLetter>> {
    let state = stream
        .info()
        .await
        .doing(|| "reading the dead-letter stream".into())?
        .state
        .clone();
    let mut found = Vec::new();
    if state.messages == 0 {
        return Ok(found);
    }
    let mut sequence = state.last_sequence;
    while sequence >= state.first_sequence && found.len() < limit {
        // Replayed and purged letters leave gaps; those sequences are skipped.
        if let Ok(letter) = get(stream, sequence).await {
            if filter.admits(&letter) {
                found.push(letter);
            }
        }
        if sequence == 0 {
            break;
        }
        sequence -= 1;
    }
    Ok(found)
}
